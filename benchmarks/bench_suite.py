"""The parent's run: rounds of every scenario, raw and brokerjobs interleaved, then the report."""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit

from bench_common import RETRY_DELAY_S, ChildConfig, Result
from bench_parent import Bench, open_admin
from bench_report import Results, legend, result_line, table
from bench_scenarios import SCENARIOS, Scenario


@dataclass(frozen=True, slots=True)
class Options:
    url: str
    jobs: int
    rounds: int
    latency_jobs: int
    retry_jobs: int
    rate: float
    prefetch: int
    profile_dir: Path | None
    quick: bool = False  # a smoke test: each scenario once per arm
    only: tuple[str, ...] = ()  # scenario names to run; empty: all

    @property
    def scenarios(self) -> list[Scenario]:
        return [s for s in SCENARIOS if not self.only or s.name in self.only]


def _names() -> tuple[str, str]:
    prefix = f"bjbench.{uuid.uuid4().hex[:10]}"
    return prefix, f"{prefix}.jobs"


def _child_timeout(options: Options) -> float:
    return 30 + options.jobs / 250 + options.latency_jobs / options.rate + options.retry_jobs / 100


def _arm_order(scenario: Scenario, run: int) -> tuple[str, ...]:
    """Alternate which arm goes first, so neither always runs on a warmer broker."""
    keys = tuple(arm.key for arm in scenario.arms)
    return keys if run % 2 == 0 else keys[::-1]


def _progress(
    round_index: int, options: Options, scenario: Scenario, arm: str, r: Result, took: float
) -> None:
    values = " ".join(f"{key}={value:,.2f}" for key, value in r.items())
    print(
        f"[round {round_index + 1}/{options.rounds}] {scenario.name:<9} {arm:<4} "
        f"({took:4.1f}s) {values}",
        file=sys.stderr,
        flush=True,
    )


async def _run_rounds(bench: Bench, options: Options) -> Results:
    results = Results()
    for round_index in range(options.rounds):
        bench.round = round_index
        for scenario in options.scenarios:
            bench.scenario = scenario.name
            for repetition in range(1 if options.quick else scenario.repeat):
                bench.repetition = repetition
                for arm in _arm_order(scenario, round_index * scenario.repeat + repetition):
                    began = time.monotonic()
                    result = await scenario.measure(bench, arm)
                    results.add(scenario, arm, result)
                    took = time.monotonic() - began
                    _progress(round_index, options, scenario, arm, result, took)
    return results


def _revision() -> str:
    """The repository's commit, marked when brokerjobs/ has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "brokerjobs"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes' if dirty else ''}"


def _header(options: Options, elapsed: float) -> list[str]:
    host = urlsplit(options.url).hostname
    lines = [
        f"brokerjobs ({_revision()}) vs raw aio-pika: {options.jobs} jobs, "
        f"{options.rounds} round(s); cells: median (min-max) over rounds; ^ higher is better, "
        "v lower is better",
        f"RabbitMQ at {host}; Python {platform.python_version()}, aio-pika {version('aio-pika')}, "
        f"pydantic {version('pydantic')}; {os.cpu_count()} CPU(s); took {elapsed:.0f}s",
    ]
    if options.profile_dir is not None:
        lines.append(f"PROFILED under cProfile (figures inflated): stats in {options.profile_dir}")
    return lines


def _cancel_on_signals() -> None:
    """SIGTERM/SIGINT cancel the run, so children are killed and the broker is cleaned up."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)


async def run_suite(options: Options) -> None:
    exchange, queue = _names()
    cfg = ChildConfig(
        url=options.url,
        exchange=exchange,
        queue=queue,
        jobs=options.jobs,
        prefetch=options.prefetch,
        rate=options.rate,
        timeout=_child_timeout(options),
    )
    started = time.monotonic()
    _cancel_on_signals()
    async with open_admin(cfg) as admin:
        bench = Bench(admin, cfg, options.latency_jobs, options.retry_jobs, options.profile_dir)
        results = await _run_rounds(bench, options)
    params = {
        "jobs": options.jobs,
        "latency_jobs": options.latency_jobs,
        "retry_jobs": options.retry_jobs,
        "paced_retry_jobs": bench.paced_retry_jobs,
        "delay_ms": RETRY_DELAY_S * 1000,
        "rate": options.rate,
        "prefetch": options.prefetch,
    }
    lines = [
        *_header(options, time.monotonic() - started),
        "",
        *table(results, options.scenarios, params),
        "",
        *legend(options.scenarios),
        result_line(results, options.scenarios),
    ]
    print("\n".join(lines), flush=True)
