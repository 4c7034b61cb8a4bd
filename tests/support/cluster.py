"""A throwaway 3-node RabbitMQ cluster beside the shared broker, for node-failure tests.

Everything lives under one run directory (``$TMPDIR/bjcluster/run-<pid>-<n>``): its own ``HOME``
with its own ``.erlang.cookie``, its own epmd on a free port, and per node its data, logs,
config, plugin list and pid file. The nodes are started with the scripts in
``/usr/lib/rabbitmq/bin`` (the ``/usr/sbin`` wrappers would switch user and pick up the shared
node's cookie). Ports are picked free at start, so runs never collide with each other or with
the shared node on 5672/4369, which this module never touches.

Cleanup is by pid file only: ``stop()`` SIGKILLs the pids this run recorded. A run that died
without cleaning up is reaped by the next one: a run directory whose ``owner.pid`` process is
gone has its recorded pids killed (only if their command line still names that directory).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.cluster_processes import (
    ROOT,
    ClusterError,
    cmdline,
    free_port,
    pid_alive,
    read_pid,
    reap_stale_runs,
)

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
EPMD_CANDIDATES = ("/usr/bin/epmd", "/usr/lib/erlang/bin/epmd")
NODE_NAMES = ("bjca", "bjcb", "bjcc")
START_TIMEOUT = 90.0
CTL_TIMEOUT = 60.0
DLX_CONFIRM_TIMEOUT_MS = 5000


@dataclass
class Node:
    name: str  # short name, e.g. "bjca"
    amqp_port: int
    dist_port: int
    dir: Path
    run_dir_seen: str = ""  # the run directory as the node's processes see it (in a chroot)

    @property
    def nodename(self) -> str:
        return f"{self.name}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def pid_file(self) -> Path:
        return self.dir / "node.pid"

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    def pid(self) -> int | None:
        return read_pid(self.pid_file)

    def is_running(self) -> bool:
        pid = self.pid()
        # The VM's command line names the run directory (its HOME), not the node directory.
        seen = self.run_dir_seen or str(self.dir.parent)
        return pid is not None and pid_alive(pid) and seen in cmdline(pid)

    def log_tail(self, lines: int = 30) -> str:
        chunks = []
        for log in sorted(self.log_dir.glob("*.log")):
            with contextlib.suppress(OSError):
                chunks.append(
                    f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-lines:])
                )
        return "\n".join(chunks) or "(no log)"


class RabbitCluster:
    """Three RabbitMQ nodes (``bjca``, ``bjcb``, ``bjcc``) clustered on loopback."""

    def __init__(
        self,
        root: Path = ROOT,
        names: Sequence[str] = NODE_NAMES,
        dlx_confirm_timeout_ms: int | None = DLX_CONFIRM_TIMEOUT_MS,
        chroot: Path | None = None,
    ) -> None:
        """``dlx_confirm_timeout_ms=None`` keeps RabbitMQ's default (180 000 ms). ``chroot``
        runs the nodes and CLI tools of another RabbitMQ installed in that directory (e.g. a
        Debian 13 chroot with 4.0), as root; the run directory then lives inside it."""
        self.dlx_confirm_timeout_ms = dlx_confirm_timeout_ms
        self.chroot = chroot
        if chroot is not None and root == ROOT:
            root = chroot / "tmp" / "bjcluster"
        root.mkdir(parents=True, exist_ok=True)
        reap_stale_runs(root, chroot)
        self.dir = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=root))
        (self.dir / "owner.pid").write_text(str(os.getpid()))
        self.home = self.dir / "home"
        self.home.mkdir()
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        taken: list[int] = []
        for _ in range(1 + 2 * len(names)):
            taken.append(free_port(taken))
        self.epmd_port = taken[0]
        self.nodes = [
            Node(name, taken[1 + 2 * i], taken[2 + 2 * i], self.dir / name, self.seen(self.dir))
            for i, name in enumerate(names)
        ]
        self._epmd: subprocess.Popen[bytes] | None = None

    # -- environment -----------------------------------------------------------------------

    def seen(self, path: Path) -> str:
        """``path`` as the node's processes see it (inside the chroot, if any)."""
        return "/" + str(path.relative_to(self.chroot)) if self.chroot else str(path)

    def _command(self, tool: str, *args: str) -> list[str]:
        command = [str(RABBIT_BIN / tool), *args]
        return ["chroot", str(self.chroot), *command] if self.chroot else command

    def _base_env(self) -> dict[str, str]:
        keep = ("PATH", "LANG", "LC_ALL", "TMPDIR")
        env = {k: v for k, v in os.environ.items() if k in keep}
        env.update(
            HOME=self.seen(self.home),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_CONF_ENV_FILE=self.seen(self.dir / "empty-env.conf"),
            LANG=env.get("LANG", "C.UTF-8"),
        )
        return env

    def node_env(self, node: Node) -> dict[str, str]:
        env = self._base_env()
        env.update(
            RABBITMQ_NODENAME=node.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(node.amqp_port),
            RABBITMQ_DIST_PORT=str(node.dist_port),
            RABBITMQ_MNESIA_BASE=self.seen(node.dir / "mnesia"),
            RABBITMQ_LOG_BASE=self.seen(node.log_dir),
            RABBITMQ_CONFIG_FILE=self.seen(node.dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=self.seen(node.dir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=self.seen(node.dir / "enabled_plugins"),
            RABBITMQ_PID_FILE=self.seen(node.pid_file),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _write_node_files(self, node: Node) -> None:
        node.dir.mkdir(exist_ok=True)
        node.log_dir.mkdir(exist_ok=True)
        (node.dir / "enabled_plugins").write_text("[].\n")
        # At-least-once dead-lettering (quorum retry tiers -> main queue) re-sends a dead letter
        # whose target did not confirm only after this timeout (RabbitMQ default 180 s). A leader
        # failover can leave dead letters waiting for it; 5 s keeps them inside the test's time.
        timeout = self.dlx_confirm_timeout_ms
        setting = f"{{dead_letter_worker_publisher_confirm_timeout, {timeout}}}" if timeout else ""
        (node.dir / "advanced.config").write_text(f"[{{rabbit, [{setting}]}}].\n")
        (node.dir / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    f"listeners.tcp.1 = 127.0.0.1:{node.amqp_port}",
                    "loopback_users.guest = true",
                    "disk_free_limit.absolute = 50MB",
                    "vm_memory_high_watermark.relative = 0.2",
                    "log.file.level = info",
                    "log.console = false",
                    "",
                ]
            )
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start epmd and the three nodes, then join the 2nd and 3rd to the 1st."""
        if self.chroot is not None and not (self.chroot / "proc" / "self").exists():
            raise ClusterError(
                f"{self.chroot}/proc is not mounted: mount -t proc proc {self.chroot}/proc"
            )
        (self.dir / "empty-env.conf").write_text("")
        self._start_epmd()
        for node in self.nodes:
            self._write_node_files(node)
            self._spawn(node)
        for node in self.nodes:
            self.wait_node(node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "reset")
            self.ctl(node, "join_cluster", first.nodename)
            self.ctl(node, "start_app")
        for node in self.nodes:
            self.ctl(node, "await_startup")
        running = self.running_nodes(first)
        if sorted(running) != sorted(n.nodename for n in self.nodes):
            raise ClusterError(f"cluster did not form: running nodes {running}")

    def _start_epmd(self) -> None:
        epmd = next((p for p in EPMD_CANDIDATES if Path(p).exists()), None) or shutil.which("epmd")
        if epmd is None:
            raise ClusterError("epmd not found (install rabbitmq-server / erlang-base)")
        log = (self.dir / "epmd.log").open("ab")
        # argv[0] names the run directory so that a later run can tell this epmd is ours.
        self._epmd = subprocess.Popen(
            [f"{epmd} ({self.dir})", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            executable=epmd,
            env=self._base_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        (self.dir / "epmd.pid").write_text(str(self._epmd.pid))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.epmd_port), 0.5),
            ):
                return
            if self._epmd.poll() is not None:
                break
            time.sleep(0.05)
        raise ClusterError(f"epmd did not start on port {self.epmd_port}")

    def _spawn(self, node: Node) -> None:
        node.pid_file.unlink(missing_ok=True)
        out = (node.dir / "start.out").open("ab")
        result = subprocess.run(
            self._command("rabbitmq-server", "-detached"),
            env=self.node_env(node),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
        out.close()
        if result.returncode != 0:
            raise ClusterError(
                f"rabbitmq-server -detached for {node.nodename} exited "
                f"{result.returncode}\n{node.log_tail()}"
            )

    def wait_node(self, node: Node, timeout: float = START_TIMEOUT) -> None:
        """Wait for the node's pid file, then for the broker app to be fully started."""
        try:
            self.ctl(
                node,
                "wait",
                "--timeout",
                str(int(timeout)),
                self.seen(node.pid_file),
                timeout=timeout + 10,
            )
        except ClusterError as exc:
            raise ClusterError(f"{node.nodename} did not start: {exc}\n{node.log_tail()}") from None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", node.amqp_port), 0.5),
            ):
                return
            time.sleep(0.1)
        raise ClusterError(f"{node.nodename} is up but not listening on {node.amqp_port}")

    def kill(self, node: Node) -> int:
        """SIGKILL the node's VM (no clean shutdown); returns the pid killed."""
        pid = node.pid()
        if pid is None or not node.is_running():
            raise ClusterError(f"{node.nodename} is not running")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        return pid

    def restart(self, node: Node) -> None:
        """Start a stopped (killed) node again with its data; it rejoins the cluster."""
        self._spawn(node)
        self.wait_node(node)
        self.ctl(node, "await_startup")

    def stop(self) -> None:
        """Kill every process this run started (by pid file), then remove the run directory."""
        for node in self.nodes:
            pid = node.pid()
            if pid is not None and node.is_running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._epmd is not None:
            with contextlib.suppress(ProcessLookupError):
                self._epmd.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._epmd.wait(5)
        deadline = time.monotonic() + 10
        while any(n.is_running() for n in self.nodes) and time.monotonic() < deadline:
            time.sleep(0.05)
        if any(n.is_running() for n in self.nodes):
            # Keep the pid files: the next run's reap_stale_runs() kills what is left.
            raise ClusterError(f"nodes still running after SIGKILL; left {self.dir} for reaping")
        if not os.environ.get("BJCLUSTER_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- the command-line tools ----------------------------------------------------------------

    def ctl(
        self, node: Node, *args: str, tool: str = "rabbitmqctl", timeout: float = CTL_TIMEOUT
    ) -> str:
        """Run a CLI tool against ``node``; raises ClusterError with its output on failure."""
        command = self._command(tool, "-n", node.nodename, "-q", *args)
        try:
            result = subprocess.run(
                command,
                env=self.node_env(node),
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{' '.join(command[1:])} timed out after {timeout:g}s") from None
        if result.returncode != 0:
            raise ClusterError(
                f"{tool} {' '.join(args)} on {node.nodename} exited {result.returncode}: "
                f"{(result.stdout + result.stderr).strip()[-2000:]}"
            )
        return result.stdout

    def ctl_json(self, node: Node, *args: str, tool: str = "rabbitmqctl") -> Any:
        return json.loads(self.ctl(node, *args, "--formatter", "json", tool=tool) or "null")

    def running_nodes(self, via: Node) -> list[str]:
        status = self.ctl_json(via, "cluster_status")
        return [str(n) for n in status.get("running_nodes", [])]

    def node_by_name(self, nodename: str) -> Node:
        for node in self.nodes:
            if node.nodename == nodename:
                return node
        raise ClusterError(f"no node {nodename!r} in this cluster")


@contextlib.contextmanager
def running_cluster(
    dlx_confirm_timeout_ms: int | None = DLX_CONFIRM_TIMEOUT_MS, chroot: Path | None = None
) -> Iterator[RabbitCluster]:
    """A started 3-node cluster, killed (by pid file) when the block exits, even on failure."""
    cluster = RabbitCluster(dlx_confirm_timeout_ms=dlx_confirm_timeout_ms, chroot=chroot)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
