"""Raw aio-pika doing a brokerjobs worker's typed decoding, with no brokerjobs at all: bench_raw's
consume task, its callback validating each body with ``BenchOrder.model_validate_json`` (the
model brokerjobs' arm registers as its job, validated as brokerjobs' envelope validates it)
instead of ``json.loads``, then the same no-op handler and ``await message.ack()``.

The floor pydantic sets under brokerjobs' RSS and CPU per job; its own module, so that the
plain raw child never loads pydantic.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import bench_raw
from bench_common import ChildConfig, Result
from bench_order import BenchOrder


async def consume(cfg: ChildConfig) -> Result:
    return await bench_raw.consume_decoded(cfg, BenchOrder.model_validate_json)


TASKS: dict[str, Callable[[ChildConfig], Awaitable[Result]]] = {"consume": consume}
