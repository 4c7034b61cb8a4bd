"""Run the containers' commands here, without Docker, against the local broker.

The worker runs exactly as the image would run it: the Dockerfile's ENTRYPOINT + CMD (the same
as compose's and the Deployment's args), from a working directory laid out like the image's
WORKDIR (only ``examples/`` in it), with the environment compose (or the Kubernetes ConfigMap)
gives it; only BROKERJOBS_URL points at the local broker and the health port is a free one.
Then the health endpoints and the HEALTHCHECK / probe commands must pass, the compose producer
command must run to completion, and SIGTERM must stop the worker cleanly within the grace.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.manifests import (
    REPO,
    as_argv,
    compose,
    compose_environment,
    dockerfile_env,
    dockerfile_stages,
    exec_form,
    healthcheck_command,
    one,
    parse_duration,
    rendered,
)
from tests.support.broker import TEST_URL

pytestmark = pytest.mark.usefixtures("_require_broker")

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve(argv: list[str]) -> list[str]:
    """The image's PATH starts with its venv: use this venv's console scripts and python."""
    head = argv[0]
    if head in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    candidate = BIN / head
    return [str(candidate) if candidate.exists() else head, *argv[1:]]


def base_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKERJOBS_", "OTEL_"))}
    env.update(extra)
    env["PYTHONPATH"] = ""  # nothing from the repo but what the image has (the installed package)
    return env


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@dataclass
class Layout:
    workdir: Path
    worker_argv: list[str]
    healthcheck: list[str]
    image_env: dict[str, str]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """What the image holds: WORKDIR with examples/, its ENV, ENTRYPOINT + CMD, HEALTHCHECK."""
    _, stages = dockerfile_stages()
    final = stages[-1]
    workdir = tmp_path_factory.mktemp("app")
    shutil.copytree(
        REPO / "examples", workdir / "examples", ignore=shutil.ignore_patterns("__pycache__")
    )
    argv = exec_form(final.last("ENTRYPOINT") or "") + exec_form(final.last("CMD") or "")
    env = dockerfile_env(final)
    env.pop("PATH", None)
    return Layout(workdir, argv, healthcheck_command(final), env)


def compose_worker_env() -> dict[str, str]:
    return compose_environment(compose()["services"]["worker"])


def k8s_worker_env() -> dict[str, str]:
    docs = rendered()
    env = dict(one(docs, "ConfigMap")["data"])
    env.update(one(docs, "Secret")["stringData"])
    return env


class RunningWorker:
    def __init__(self, layout: Layout, env: dict[str, str], log: Path) -> None:
        self.port = int(env["BROKERJOBS_HEALTH_PORT"])
        self.env = env
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            resolve(layout.worker_argv),
            cwd=layout.workdir,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_status(self, path: str, status: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.output()}")
            if http_status(self.port, path) == status:
                return
            time.sleep(0.1)
        raise AssertionError(f"{path} never answered {status}:\n{self.output()}")

    def stop(self, timeout: float) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"worker ignored SIGTERM for {timeout}s") from None
        self._out.close()
        return self.proc.returncode


@pytest.fixture(params=["compose", "kubernetes"])
def worker(
    request: pytest.FixtureRequest, image: Layout, tmp_path: Path
) -> Iterator[RunningWorker]:
    """The worker with the image's ENV overlaid by compose's or the ConfigMap's + Secret's."""
    env = compose_worker_env() if request.param == "compose" else k8s_worker_env()
    env = {
        **image.image_env,
        **env,
        "BROKERJOBS_URL": TEST_URL,
        "BROKERJOBS_HEALTH_PORT": str(free_port()),
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
    }
    running = RunningWorker(image, base_env(env), tmp_path / "worker.log")
    try:
        yield running
    finally:
        running.stop(timeout=30)


def test_the_image_command_serves_health_and_readiness_and_passes_its_healthcheck(
    worker: RunningWorker, image: Layout
) -> None:
    worker.wait_status("/healthz", 200)
    worker.wait_status("/readyz", 200)
    assert http_status(worker.port, "/nope") == 404
    # HEALTHCHECK / compose healthcheck: `brokerjobs health`, port from BROKERJOBS_HEALTH_PORT.
    check = subprocess.run(
        resolve(image.healthcheck), env=worker.env, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    live = subprocess.run(
        resolve(["brokerjobs", "health", "--live", "--port", str(worker.port)]),
        env=worker.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert live.returncode == 0, live.stdout + live.stderr


def test_brokerjobs_health_fails_when_nothing_serves_the_port(image: Layout) -> None:
    env = base_env({**image.image_env, "BROKERJOBS_HEALTH_PORT": str(free_port())})
    check = subprocess.run(
        resolve(image.healthcheck), env=env, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 1, check.stdout + check.stderr


def test_compose_producer_command_runs_to_completion_and_the_worker_drains_on_sigterm(
    image: Layout, tmp_path: Path
) -> None:
    services = compose()["services"]
    env = {
        **image.image_env,
        **compose_worker_env(),
        "BROKERJOBS_URL": TEST_URL,
        "BROKERJOBS_HEALTH_PORT": str(free_port()),
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
    }
    worker = RunningWorker(image, base_env(env), tmp_path / "worker.log")
    try:
        worker.wait_status("/readyz", 200)
        producer = services["producer"]
        argv = as_argv(producer["entrypoint"]) + as_argv(producer["command"])
        assert argv[-2] == "--count"
        argv[-1] = "20"  # a quick run
        producer_env = {
            **image.image_env,
            **compose_environment(producer),
            "BROKERJOBS_URL": TEST_URL,
        }
        run = subprocess.run(
            resolve(argv),
            cwd=image.workdir,
            env=base_env(producer_env),
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "all 20 jobs finished: 20 completed" in run.stdout + run.stderr
    finally:
        grace = parse_duration(services["worker"]["stop_grace_period"])
        code = worker.stop(timeout=grace)
    assert code == 0, worker.output()
    assert "worker stopped" in worker.output()
