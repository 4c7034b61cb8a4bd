"""Fuzzing the delivery path: no generated message stalls, loops, crashes or goes missing.

Runs the real consumer, settlement and retry policy on the in-memory broker. Every message
published ends in exactly one place: handled, or parked with a reason; nothing stays unacked
and no retry tier holds anything once the virtual clock has run out.
``BROKERJOBS_FUZZ_EXAMPLES`` and ``BROKERJOBS_FUZZ_BATCH`` make a long run; with ``-s`` it
prints how many messages went through.
"""

from __future__ import annotations

import asyncio
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brokerjobs import App
from brokerjobs.envelope import PARK_REASON, OutgoingMessage
from brokerjobs.settings import load_settings
from brokerjobs.testing import TestBroker
from tests.support.wire_fuzz import JOB_NAME, FuzzJob, messages

EXAMPLES = int(os.environ.get("BROKERJOBS_FUZZ_EXAMPLES", "1500"))
BATCH = int(os.environ.get("BROKERJOBS_FUZZ_BATCH", "6"))  # messages per example, at most
PUBLISHED: list[int] = []  # messages per example run, for a long run's report
SETTINGS = load_settings(max_body_bytes=16_384, max_json_depth=32)
REGRESSIONS: list[OutgoingMessage] = [
    # Inputs that once stalled a worker or crashed the decoder (issue 9).
    OutgoingMessage(b"[" * 1000 + b"]" * 1000, "deep", JOB_NAME, 0, {}),
    OutgoingMessage(b'{"n": 1' + b"0" * 5000 + b"}", "long-int", JOB_NAME, 0, {}),
    OutgoingMessage(b'{"n": 1, "fail": true}', "huge-attempt", JOB_NAME, 0, {"bj-attempt": 10**30}),
    OutgoingMessage(b'{"n": 1, "fail": true}', "negative-attempt", JOB_NAME, 0, {"bj-attempt": -5}),
    OutgoingMessage(b'{"n": 1, "fail": true}', "no-type", None, 0, {}),
    OutgoingMessage(b'{"n": 1}', "hex-trace", JOB_NAME, 0, {"traceparent": "00-zz-yy-01"}),
]


async def _every_message_ends_in_exactly_one_place(batch: list[OutgoingMessage]) -> None:
    app = App("fuzz")
    queue = app.queue("fuzz.jobs", "fuzz.#")
    handled: list[str] = []

    @app.handler(FuzzJob, queue=queue)
    async def handle(job: FuzzJob) -> None:
        if job.fail:
            raise RuntimeError("told to fail")
        handled.append(str(job.n))

    async with TestBroker(app, SETTINGS) as broker:
        for message in batch:
            await broker.publish_message(message, JOB_NAME)
        await broker.run_until_idle()  # raises if anything stayed unacked or escaped
        completed = [o.job_id for o in broker.outcomes if o.action == "completed"]
        parked = broker.messages(f"{queue.name}.parked")
        depths = broker.queue_depths()

    assert [m.message_id for m in parked if not m.headers.get(PARK_REASON)] == []
    placed = sorted(completed + [m.message_id or "" for m in parked])
    assert placed == sorted(m.message_id for m in batch)
    assert {name: n for name, n in depths.items() if n and not name.endswith(".parked")} == {}


def test_regression_corpus_is_parked_or_handled() -> None:
    asyncio.run(_every_message_ends_in_exactly_one_place(REGRESSIONS))


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(messages(), min_size=max(1, BATCH // 2), max_size=BATCH))
def test_generated_messages_never_stall_loop_or_vanish(batch: list[OutgoingMessage]) -> None:
    asyncio.run(_every_message_ends_in_exactly_one_place(batch))
    PUBLISHED.append(len(batch))
    if len(PUBLISHED) % 1000 == 0:  # progress of a long run (shown with -s)
        print(f"\n[fuzz] {len(PUBLISHED)} examples, {sum(PUBLISHED)} messages so far", flush=True)


def teardown_module() -> None:
    if PUBLISHED:
        print(f"\n[fuzz] {len(PUBLISHED)} examples passed, {sum(PUBLISHED)} messages")
