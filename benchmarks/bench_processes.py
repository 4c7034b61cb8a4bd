"""Drain rate of ``brokerjobs worker --processes N`` for several N, against the local broker.

    python benchmarks/bench_processes.py [--jobs 20000] [--processes 1,2] [--rounds 2]

Publishes the jobs first, then starts the supervisor and times until the queue is empty (its
depth polled every 50 ms), so the figure is the consume side only. The broker shares the
machine's cores with the workers: on 2 cores a second process competes with the broker itself.
Run as a module of its own (``BJPROC_NAME`` names the app in the children).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from pydantic import BaseModel

from brokerjobs import App, Publisher, Settings, job

ROOT = Path(__file__).resolve().parents[1]
URL = os.environ.get("BROKERJOBS_BENCH_URL", "amqp://guest:guest@127.0.0.1:5672/")


@job("proc.bench")
class ProcJob(BaseModel):
    n: int
    text: str


def build_app(name: str) -> App:
    app = App(name)
    queue = app.queue(f"{name}.jobs", "proc.#")

    @app.handler(ProcJob, queue=queue)
    async def handle(task: ProcJob) -> None:
        return None

    return app


app = build_app(os.environ.get("BJPROC_NAME", "bjbench.proc.default"))
WORKER_TARGET = "benchmarks.bench_processes:app"


async def drain_rate(processes: int, jobs: int) -> float:
    name = f"bjbench.proc.{uuid.uuid4().hex[:8]}"
    bench_app = build_app(name)
    settings = Settings(url=URL)
    from brokerjobs.broker.amqp import connect
    from brokerjobs.provision import declare

    connection = await connect(settings, "bench")
    try:
        await declare(connection, bench_app.topology())
        async with Publisher(settings, exchange=bench_app.exchange) as publisher:
            await publisher.publish_many(ProcJob(n=i, text="x" * 64) for i in range(jobs))
        env = {**os.environ, "BJPROC_NAME": name, "BROKERJOBS_URL": URL, "PYTHONPATH": str(ROOT)}
        env["BROKERJOBS_LOG_LEVEL"] = "WARNING"
        command = [sys.executable, "-m", "brokerjobs.cli", "worker", WORKER_TARGET]
        worker = await asyncio.create_subprocess_exec(
            *command, "--processes", str(processes), cwd=ROOT, env=env
        )
        channel = await connection.channel(confirms=False)
        started = None  # from the first job taken: process start-up is not drain time
        while (left := (await channel.inspect_queue(f"{name}.jobs")).messages) > 0:
            if started is None and left < jobs:
                started, taken = time.monotonic(), jobs - left
            await asyncio.sleep(0.02)  # polling the broker: there is no event to wait on
        assert started is not None
        elapsed = time.monotonic() - started
        jobs -= taken
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 60)
        for queue in bench_app.topology().queues:
            await channel.delete_queue(queue.name)
        await channel.delete_exchange(bench_app.exchange)
    finally:
        await connection.close()
    return jobs / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    rates: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.rounds):
        for n in counts:  # interleaved rounds, as benchmarks/run.py does
            rates[n].append(await drain_rate(n, args.jobs))
            print(f"processes={n} drain {rates[n][-1]:,.0f} jobs/s")
    base = max(rates[counts[0]])
    for n in counts:
        best = max(rates[n])
        print(f"RESULT processes={n} best={best:,.0f} jobs/s ratio={best / base:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
