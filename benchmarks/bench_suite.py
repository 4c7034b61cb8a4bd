"""The parent's run: rounds of every scenario, raw and brokerjobs interleaved, then the report."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit

from bench_common import RETRY_DELAY_S, ChildConfig, Result
from bench_host import ROOT, Checkout, broker_pid, byte_compile, checkout
from bench_parent import Bench, BenchError, Place, open_admin
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
    baseline: str | None = None  # a git revision whose brokerjobs is one more contestant

    @property
    def scenarios(self) -> list[Scenario]:
        """The chosen scenarios, without baseline arms unless there is a baseline."""
        chosen = [s for s in SCENARIOS if not self.only or s.name in self.only]
        keep = self.baseline is not None
        return [replace(s, arms=tuple(a for a in s.arms if keep or not a.baseline)) for s in chosen]


def _available(scenarios: list[Scenario]) -> tuple[list[Scenario], list[str]]:
    """The scenarios this tree can run, and a line for each one skipped."""
    runnable, skipped = [], []
    for s in scenarios:
        reason = s.unavailable() if s.unavailable is not None else None
        if reason is None:
            runnable.append(s)
        else:
            skipped.append(f"{s.name}: skipped: {reason}")
    return runnable, skipped


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
        f"[round {round_index + 1}/{options.rounds}] {scenario.name:<9} {arm:<5} "
        f"({took:4.1f}s) {values}",
        file=sys.stderr,
        flush=True,
    )


async def _run_rounds(bench: Bench, options: Options, scenarios: list[Scenario]) -> Results:
    results = Results()
    for round_index in range(options.rounds):
        bench.round = round_index
        for scenario in scenarios:
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


def _header(options: Options, elapsed: float, bench: Bench, tree: Checkout | None) -> list[str]:
    host = urlsplit(options.url).hostname
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"brokerjobs ({_revision()}) vs raw aiormq and aio-pika: {options.jobs} jobs, "
        f"{options.rounds} round(s); cells: median (min-max) over rounds; ^ higher is better, "
        "v lower is better",
        f"RabbitMQ at {host}; Python {platform.python_version()}, aio-pika {version('aio-pika')}, "
        f"aiormq {version('aiormq')}, pydantic {version('pydantic')}; {os.cpu_count()} CPU(s), "
        f"load average at the end {load}; took {elapsed:.0f}s",
        _broker_line(bench.base.broker_pid),
        f"brokerjobs' main queue: {_arguments(bench)}; the raw plain queue: the same without "
        "x-max-priority; the raw priority queue: the same with x-max-priority=10",
    ]
    if tree is not None:
        lines.append(
            f"baseline: {tree.rev} = {tree.commit} ({tree.subject}), from a temporary git "
            "worktree (removed)"
        )
    if options.profile_dir is not None:
        lines.append(f"PROFILED under cProfile (figures inflated): stats in {options.profile_dir}")
    return lines


def _arguments(bench: Bench) -> str:
    arguments = bench.admin.plan.queue(bench.admin.main).arguments
    return " ".join(f"{key}={value!r}" for key, value in sorted(arguments.items())) or "-"


def _broker_line(pid: int) -> str:
    if not pid:
        return "broker CPU: not measured (no single beam.smp process found for the port)"
    return (
        f"broker CPU: utime+stime of beam.smp pid {pid} around each measured phase; it counts "
        "everything the broker did meanwhile, other clients included"
    )


@contextlib.asynccontextmanager
async def _baseline(bench: Bench, rev: str | None) -> AsyncIterator[Checkout | None]:
    """With a revision: its worktree, its app's topology declared by its own worker, deleted
    (queues and exchange) and the worktree removed at the end."""
    if rev is None:
        yield None
        return
    with checkout(rev) as tree:
        byte_compile(tree.path, ("brokerjobs",))  # the children import the benchmarks from ROOT
        exchange = f"{bench.base.exchange}.old"
        bench.baseline = Place("bj", exchange, f"{exchange}.jobs", str(tree.path))
        try:
            await bench.run("old", "declare")
            yield tree
        finally:
            bench.scenario = ""
            try:
                await bench.run("old", "delete")
            except BenchError as exc:
                print(f"baseline clean-up failed: {exc}", file=sys.stderr)


def _cancel_on_signals() -> None:
    """SIGTERM/SIGINT cancel the run, so children are killed and the broker is cleaned up."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)


def _child_config(options: Options) -> ChildConfig:
    exchange, queue = _names()
    return ChildConfig(
        url=options.url,
        exchange=exchange,
        queue=queue,
        jobs=options.jobs,
        prefetch=options.prefetch,
        rate=options.rate,
        timeout=_child_timeout(options),
        broker_pid=broker_pid(urlsplit(options.url).port or 5672) or 0,
    )


async def run_suite(options: Options) -> None:
    cfg = _child_config(options)
    started = time.monotonic()
    byte_compile(ROOT)
    _cancel_on_signals()
    scenarios, skipped = _available(options.scenarios)
    for line in skipped:
        print(line, file=sys.stderr, flush=True)
    async with open_admin(cfg) as admin:
        bench = Bench(admin, cfg, options.latency_jobs, options.retry_jobs, options.profile_dir)
        async with _baseline(bench, options.baseline) as tree:
            results = await _run_rounds(bench, options, scenarios)
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
        *_header(options, time.monotonic() - started, bench, tree),
        "",
        *(table(results, scenarios, params) if scenarios else []),
        *skipped,
        "",
        *legend(scenarios),
        result_line(results, scenarios),
    ]
    print("\n".join(lines), flush=True)
