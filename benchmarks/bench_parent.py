"""The orchestrating process: broker set-up and checks between runs, and the child processes.

Every measurement runs in a fresh child process (``run.py --child SIDE:TASK``), so each side has
its own interpreter, event loop and peak RSS; the parent only prepares and verifies the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import aio_pika
import bench_aiormq
import bench_bj
import bench_raw
from aio_pika.abc import AbstractChannel, AbstractConnection
from bench_common import JOB_NAME, RESULT_MARK, RETRY_DELAY_S, ChildConfig, Result, job_fields
from pamqp.commands import Basic

from brokerjobs import Publisher
from brokerjobs import envelope as wire
from brokerjobs.broker.amqp import Connection
from brokerjobs.envelope import Delivery, OutgoingMessage, encode
from brokerjobs.provision import declare
from brokerjobs.retry import Failure, FailureKind, Park
from brokerjobs.settlement import parked_message
from brokerjobs.topology import TopologyPlan, parking_queue_name

Side = Literal["raw", "bj", "aiormq", "typed"]
RUN_PY = Path(__file__).with_name("run.py")
CHILD_GRACE_S = 30.0  # beyond the child's own deadline, before the parent kills it
PARKED_EVERY = timedelta(milliseconds=50)  # between two prefilled parked jobs' failure times
PRIORITY_LEVELS = 10  # the raw priority queue's x-max-priority (brokerjobs' default)


@dataclass(frozen=True, slots=True)
class Place:
    """Where one contestant runs: its child module, exchange and queue, and brokerjobs tree."""

    side: Side
    exchange: str
    queue: str
    tree: str = ""  # a checkout to import brokerjobs from; "": this one


def middleware_unavailable() -> str | None:
    if bench_bj.middleware_api() is None:
        return "no middleware API in this tree"
    return None


class BenchError(RuntimeError):
    """A run went wrong: a child failed, or the queue is not in the state it must be."""


class Admin:
    """The parent's connection: declares, purges, prefills, checks and finally deletes."""

    def __init__(
        self, connection: AbstractConnection, channel: AbstractChannel, cfg: ChildConfig
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._cfg = cfg
        self._bj_connection = Connection(connection, confirm_timeout=30.0)
        self.plan: TopologyPlan = bench_bj.make_app(cfg).topology()
        self.main = cfg.queue
        self.parking = parking_queue_name(cfg.queue)
        self.retry_tier = self.plan.retry_tiers(cfg.queue)[0].name
        self._parked: list[OutgoingMessage] = []
        self.raw_places = {
            "pika": Place("raw", f"{cfg.exchange}.plain", f"{cfg.exchange}.plain.jobs"),
            "aiormq": Place("aiormq", f"{cfg.exchange}.plain", f"{cfg.exchange}.plain.jobs"),
            "typed": Place("typed", f"{cfg.exchange}.plain", f"{cfg.exchange}.plain.jobs"),
            "prio": Place("raw", f"{cfg.exchange}.prio", f"{cfg.exchange}.prio.jobs"),
        }

    async def declare(self) -> None:
        """Declare brokerjobs' own topology for the app (the replay and retry scenarios' raw
        arms use its queues too), and the raw arms' plain and priority queues."""
        await declare(self._bj_connection, self.plan)
        arguments = dict(self.plan.queue(self.main).arguments)
        arguments.pop("x-max-priority", None)
        await self._declare_raw(self.raw_places["pika"], arguments)
        arguments["x-max-priority"] = PRIORITY_LEVELS
        await self._declare_raw(self.raw_places["prio"], arguments)

    async def _declare_raw(self, place: Place, arguments: dict[str, Any]) -> None:
        exchange = await self._channel.declare_exchange(
            place.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await self._channel.declare_queue(place.queue, durable=True, arguments=arguments)
        await queue.bind(exchange, JOB_NAME)

    async def purge(self, queue: str | None = None) -> None:
        """Purge the main queue (or ``queue``)."""
        handle = await self._channel.get_queue(queue or self.main, ensure=False)
        await handle.purge()

    async def depth(self, queue: str | None = None) -> int:
        handle = await self._channel.declare_queue(queue or self.main, passive=True)
        result: Any = handle.declaration_result
        return int(result.message_count)

    async def expect_depth(self, expected: int, when: str, queue: str | None = None) -> None:
        name = queue or self.main
        depth = await self.depth(name)
        if depth != expected:
            raise BenchError(f"{when}: {name} holds {depth} message(s), expected {expected}")

    async def prefill_parked(self, count: int) -> None:
        """Fill the parking queue with ``count`` jobs parked as a brokerjobs worker parks them.

        Published with confirms to the default exchange, routing key = the parking queue name,
        through aio-pika: brokerjobs' publish path re-encodes each message's properties twice
        when its headers are unique (transport._properties), doubling the prefill's time.
        """
        if len(self._parked) != count:
            self._parked = parked_messages(self._cfg, count)
        exchange = self._channel.default_exchange
        window = self._cfg.window
        for start in range(0, count, window):
            confirmations = await asyncio.gather(
                *(
                    exchange.publish(_aio_message(m), self.parking, mandatory=True)
                    for m in self._parked[start : start + window]
                )
            )
            if not all(isinstance(c, Basic.Ack) for c in confirmations):
                raise BenchError(f"parked jobs {start}..{start + window} were not all confirmed")
        await self.expect_depth(count, f"after parking {count} job(s)", self.parking)

    async def prefill(self, place: Place, count: int) -> None:
        """Fill the place's queue with ``count`` jobs as its side's own publisher writes them
        (another tree's brokerjobs prefills in a child: ``Bench.prefill``)."""
        jobs = [job_fields(i) for i in range(count)] if place.side != "bj" else []
        if place.side in ("raw", "typed"):
            exchange = await self._channel.get_exchange(place.exchange, ensure=False)
            await bench_raw.publish_batch(exchange, jobs, self._cfg.window)
        elif place.side == "aiormq":
            channel = await self._channel.get_underlay_channel()
            await bench_aiormq.publish_batch(channel, place.exchange, jobs, self._cfg.window)
        else:
            settings = bench_bj.make_settings(self._cfg)
            async with Publisher(settings, exchange=place.exchange) as publisher:
                await publisher.publish_many(bench_bj.make_jobs(count))

    async def cleanup(self) -> None:
        """Delete every queue of the plan and the exchange; never raises."""
        with contextlib.suppress(Exception):
            channel = await self._connection.channel()
            raw = {p.queue: p.exchange for p in self.raw_places.values()}
            for queue in [*(q.name for q in self.plan.queues), *raw]:
                with contextlib.suppress(Exception):
                    await channel.queue_delete(queue)
            for exchange in (self.plan.exchange, *raw.values()):
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(exchange)


def _traceback() -> BaseException:
    """A real exception with a few frames, as a worker formats into ``bj-error-traceback``."""

    def charge(amount: float) -> None:
        raise ValueError(f"card declined for amount {amount}")

    try:
        charge(42.0)
    except ValueError as exc:
        return exc
    raise AssertionError("unreachable")


def _aio_message(message: OutgoingMessage) -> aio_pika.Message:
    return aio_pika.Message(
        message.body,
        headers=message.headers,
        content_type=message.content_type,
        message_id=message.message_id,
        type=message.job_name,
        priority=message.priority,
        timestamp=message.timestamp,
        correlation_id=message.correlation_id,
        app_id=message.app_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def _stamp(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")  # as settlement writes them


def parked_messages(cfg: ChildConfig, count: int) -> list[OutgoingMessage]:
    """``count`` distinct jobs as brokerjobs parks them after a second failed attempt
    (``settlement.parked_message``): the failure envelope in headers, traceback included.

    Their failure times are spread ``PARKED_EVERY`` apart, as for jobs parked over time (not all
    in the same millisecond): every job's replay copy then has its own header values.
    """
    failure = Failure(
        FailureKind.ERROR, "ValueError: card declined", None, "builtins.ValueError", _traceback()
    )
    decision = Park("gave up after 2 attempts: ValueError: card declined")
    now = datetime.now(UTC)
    messages = []
    for index, job in enumerate(bench_bj.make_jobs(count)):
        parked_at = now - (count - index) * PARKED_EVERY
        first_failed_at = parked_at - RETRY_DELAY_S * timedelta(seconds=1)
        headers = {wire.ATTEMPT: 2, wire.FIRST_FAILED_AT: _stamp(first_failed_at)}
        sent = encode(job, headers=headers)
        delivery = Delivery(
            body=sent.body,
            delivery_tag=0,
            exchange=cfg.exchange,
            routing_key=JOB_NAME,
            redelivered=False,
            message_id=sent.message_id,
            job_name=sent.job_name,
            content_type=sent.content_type,
            priority=sent.priority,
            timestamp=first_failed_at - timedelta(milliseconds=5),
            headers=sent.headers,
            delivery_mode=2,
        )
        message = parked_message(delivery, cfg.queue, failure, decision)
        message.headers[wire.LAST_FAILED_AT] = message.headers[wire.PARKED_AT] = _stamp(parked_at)
        messages.append(message)
    return messages


@contextlib.asynccontextmanager
async def open_admin(cfg: ChildConfig) -> AsyncIterator[Admin]:
    connection = await aio_pika.connect(cfg.url)
    try:
        admin = Admin(connection, await connection.channel(publisher_confirms=True), cfg)
        try:
            await admin.declare()
            yield admin
        finally:
            await admin.cleanup()
    finally:
        await connection.close()


@dataclass
class Bench:
    """What a scenario function gets: the broker, the base child config, run parameters."""

    admin: Admin
    base: ChildConfig
    latency_jobs: int
    retry_jobs: int
    profile_dir: Path | None = None
    round: int = 0
    repetition: int = 0  # within the round, for scenarios run more than once per round
    scenario: str = ""  # the one running (names profile files)
    baseline: Place | None = None  # brokerjobs from another commit (--baseline)

    def place(self, arm: str) -> Place:
        """Where arm ``arm`` runs: raw arms on their own queues, brokerjobs (and ``raw`` in the
        replay scenario) on the app's, the baseline on its own app's."""
        if arm in self.admin.raw_places:
            return self.admin.raw_places[arm]
        if arm == "old" and self.baseline is not None:
            return self.baseline
        if arm == "raw":
            return Place("raw", self.base.exchange, self.base.queue)
        if arm == "bj":
            return Place("bj", self.base.exchange, self.base.queue)
        raise BenchError(f"arm {arm!r} has no place")

    async def run(self, arm: str, task: str, **changes: Any) -> Result:
        """Run ``task`` for ``arm`` in a fresh process, on the arm's place."""
        place = self.place(arm)
        where = {"exchange": place.exchange, "queue": place.queue, "tree": place.tree}
        return await self.child(place.side, task, arm, **(where | changes))

    async def prefill(self, arm: str, count: int) -> None:
        """Fill the arm's queue with ``count`` jobs as its own publisher writes them."""
        place = self.place(arm)
        if place.tree:
            await self.run(arm, "prefill", jobs=count)
        else:
            await self.admin.prefill(place, count)
        await self.admin.expect_depth(count, f"after prefilling {count} {arm} job(s)", place.queue)

    @property
    def paced_retry_jobs(self) -> int:
        """Jobs of the paced retry run: a tenth of the drained ones (200: 1 s at 200/s)."""
        return max(1, self.retry_jobs // 10)

    async def child(self, side: Side, task: str, arm: str = "", **changes: Any) -> Result:
        """Run ``task`` of ``side``'s module (bench_raw, bench_typed, bench_aiormq or bench_bj)
        in a fresh process; ``arm`` names its profile when it is not the side."""
        cfg = replace(self.base, **changes)
        profile = None
        if self.profile_dir is not None:
            name = "-".join(filter(None, (self.scenario, arm or side, task, cfg.variant)))
            profile = self.profile_dir / f"{name}-round{self.round + 1}.{self.repetition + 1}.prof"
        return await spawn_child(side, task, cfg, profile)


async def spawn_child(side: Side, task: str, cfg: ChildConfig, profile: Path | None) -> Result:
    """Run one measurement in a fresh interpreter and return the JSON it reports."""
    argv = [str(RUN_PY), "--child", f"{side}:{task}", "--config", cfg.to_json()]
    if profile is not None:
        argv += ["--profile-out", str(profile)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_child_env(cfg.tree),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), cfg.timeout + CHILD_GRACE_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        tail = err.decode(errors="replace")[-3000:]
        raise BenchError(f"child {side}:{task} exited with {proc.returncode}:\n{tail}")
    return _parse_result(side, task, out.decode())


def _child_env(tree: str) -> dict[str, str] | None:
    """The child's environment: for another tree, that checkout first on PYTHONPATH.

    PYTHONPATH entries come before the venv's editable install of this tree (a meta path finder
    consulted after the path entries); the child checks where brokerjobs came from.
    """
    if not tree:
        return None
    paths = [tree, *filter(None, [os.environ.get("PYTHONPATH")])]
    return os.environ | {"PYTHONPATH": os.pathsep.join(paths)}


def _parse_result(side: Side, task: str, stdout: str) -> Result:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            data = json.loads(line[len(RESULT_MARK) :])
            return {key: float(value) for key, value in data.items()}
    raise BenchError(f"child {side}:{task} reported no result; stdout: {stdout[-1000:]!r}")
