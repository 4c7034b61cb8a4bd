"""The public API is what ``brokerjobs`` exports: pinned here, so removing a name is a decision."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import brokerjobs

PUBLIC = {
    "App", "BrokerJobsError", "BrokerUnreachable", "ConfigError", "ConnectionLost", "JobContext",
    "JobRun", "JobSpec", "JobStatus", "Middleware", "Outcome", "Park", "ParkingLot",
    "PermanentFailure", "PublishError", "Publisher", "Retry", "RetryLater", "RetryPolicy",
    "Scheduler", "Settings", "Settled", "SkipJob", "SlowJob", "StatusStore", "StatusTracker",
    "TopologyError", "TopologyMismatch", "UnroutableJob", "Worker", "current_job",
    "declare_topology", "job", "job_spec", "load_settings", "new_job_id", "report_progress",
}  # fmt: skip
ROOT = pathlib.Path(__file__).resolve().parents[2]
# Modules an application may import besides the package itself (documented in docs/).
PUBLIC_MODULES = {"brokerjobs", "brokerjobs.testing"}


def test_the_exported_names_are_pinned() -> None:
    assert set(brokerjobs.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(brokerjobs, name) is not None


def _imports(path: pathlib.Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("brokerjobs")
        ):
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(a.name for a in node.names if a.name.startswith("brokerjobs"))
    return modules


def test_the_examples_import_only_public_names() -> None:
    used = {
        str(path.relative_to(ROOT)): _imports(path) - PUBLIC_MODULES
        for path in sorted((ROOT / "examples").rglob("*.py"))
    }
    assert {path: modules for path, modules in used.items() if modules} == {}


def _loaded_by_import(modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has loaded after ``import brokerjobs``."""
    code = f"import sys, brokerjobs; print(sorted(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return list(ast.literal_eval(out.stdout.strip()))


def test_importing_the_package_does_not_load_the_amqp_client() -> None:
    assert _loaded_by_import(("aio_pika", "aiormq", "pamqp")) == []


def test_importing_the_package_loads_nothing_a_plain_worker_does_not_use() -> None:
    # Each costs a worker's peak RSS (benchmarks/run.py, "peak RSS"): the status module builds
    # the JobStatus model at import; difflib only suggests a name for a mistyped variable.
    unused = ("brokerjobs.status", "brokerjobs.slow_jobs", "brokerjobs.parking")
    assert _loaded_by_import((*unused, "brokerjobs.scheduler", "difflib")) == []
