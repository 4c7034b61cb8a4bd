"""brokerjobs vs raw aiormq and aio-pika on the local broker: publish, consume, latency, client
and broker CPU per job, consumer RSS and parked-job replay; and brokerjobs alone: the cost of a
retry hop, of telemetry and of a no-op middleware.

    python benchmarks/run.py                     # full run (10,000 jobs, 3 rounds), ~8 minutes
    python benchmarks/run.py --quick             # smoke test in seconds
    python benchmarks/run.py --baseline HEAD~1   # brokerjobs of HEAD~1 as one more contestant

The last line is ``RESULT consume_ratio=.. publish_ratio=.. latency_p50_ratio=.. rss_ratio=..
replay_rate=.. retry_hop_ms=.. telemetry_overhead=.. replay_ratio=.. retry_extra_ms=..
retry_hop_paced_ms=.. telemetry_overhead_sampled=.. publish_ratio_aiormq=.. ...`` (ratios are
brokerjobs / the other arm). See benchmarks/README.md.

Internally, ``--child SIDE:TASK --config JSON`` runs one measurement in this fresh process and
prints ``BENCH_RESULT {json}``; the parent starts those children.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from bench_common import RESULT_MARK, ChildConfig

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SIDE_MODULES = {
    "raw": "bench_raw",
    "typed": "bench_typed",
    "bj": "bench_bj",
    "aiormq": "bench_aiormq",
}
QUICK = {"jobs": 500, "rounds": 1, "latency_jobs": 100, "retry_jobs": 200}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs per publish/consume run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; cells are medians")
    parser.add_argument("--quick", action="store_true", help="small numbers, one round")
    parser.add_argument("--latency-jobs", type=int, default=1000, help="jobs per latency run")
    parser.add_argument("--rate", type=float, default=200.0, help="latency publish rate (jobs/s)")
    parser.add_argument(
        "--retry-jobs", type=int, default=2000, help="jobs per retry run (each fails once)"
    )
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument(
        "--url", default=os.environ.get("BROKERJOBS_BENCH_URL", DEFAULT_URL), help="loopback only"
    )
    parser.add_argument("--profile", type=Path, metavar="DIR", help="cProfile every child")
    parser.add_argument(
        "--only", metavar="NAMES", default="", help="comma-separated scenarios to run (default all)"
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the brokerjobs arms with brokerjobs from git revision REV (e.g. HEAD~1)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, min(getattr(args, name), value))
    counts = (args.jobs, args.rounds, args.latency_jobs, args.retry_jobs, args.prefetch)
    if min(counts) < 1 or args.rate <= 0:
        parser.error(
            "--jobs, --rounds, --latency-jobs, --retry-jobs, --prefetch and --rate must be positive"
        )
    if urlsplit(args.url).hostname not in LOOPBACK:
        parser.error(f"the benchmark only talks to a loopback broker, not {args.url!r}")
    return args


def run_child(spec: str, config: str, profile_out: Path | None) -> None:
    """Child mode: run one side's task and print its result for the parent."""
    side, task = spec.split(":", 1)
    cfg = ChildConfig.from_json(config)
    module = importlib.import_module(SIDE_MODULES[side])
    if cfg.tree:
        _check_tree(Path(cfg.tree))
    coroutine = module.TASKS[task](cfg)
    if profile_out is None:
        result = asyncio.run(coroutine)
    else:
        import cProfile

        profiler = cProfile.Profile()
        result = profiler.runcall(asyncio.run, coroutine)
        profiler.dump_stats(profile_out)
    print(RESULT_MARK + json.dumps(result), flush=True)


def _check_tree(tree: Path) -> None:
    """A baseline child must run the baseline's brokerjobs, not this tree's."""
    loaded = sys.modules.get("brokerjobs")
    where = Path(loaded.__file__ or "") if loaded is not None else None
    if where is None or not where.resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"brokerjobs was imported from {where}, not from the baseline {tree}")


def _chosen(only: str, known: list[str]) -> tuple[str, ...] | None:
    """The scenario names of ``--only``; None (after saying why) if one is unknown."""
    chosen = tuple(name for name in only.split(",") if name)
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        print(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(known)}",
            file=sys.stderr,
        )
        return None
    return chosen


def run_parent(args: argparse.Namespace) -> int:
    # Imported here: they import brokerjobs, which a raw child must never load.
    from bench_host import GitError
    from bench_parent import BenchError
    from bench_scenarios import SCENARIOS
    from bench_suite import Options, run_suite

    only = _chosen(args.only, [s.name for s in SCENARIOS])
    if only is None:
        return 2
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    options = Options(
        url=args.url,
        jobs=args.jobs,
        rounds=args.rounds,
        latency_jobs=args.latency_jobs,
        retry_jobs=args.retry_jobs,
        rate=args.rate,
        prefetch=args.prefetch,
        profile_dir=args.profile,
        quick=args.quick,
        only=only,
        baseline=args.baseline,
    )
    try:
        asyncio.run(run_suite(options))
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("benchmark interrupted", file=sys.stderr)
        return 130
    except (BenchError, GitError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        host = urlsplit(args.url).netloc.rpartition("@")[2]
        print(f"cannot reach RabbitMQ at {host}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args.child, args.config, args.profile_out)
        return 0
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
