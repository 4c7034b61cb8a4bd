"""Loading the deployment files: docker-compose.yml, deploy/Dockerfile and the kustomize base.

No Docker engine or cluster is needed: compose and Kubernetes YAML are parsed with PyYAML, the
kustomize base is rendered with ``kubectl kustomize`` when kubectl is installed (and by a small
loader of the same resources otherwise), and the Dockerfile is read instruction by instruction.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
K8S_DIR = REPO / "deploy" / "k8s"

# Kinds that live in a namespace (the ones this base uses); everything else is cluster-scoped.
NAMESPACED = {
    "ConfigMap",
    "Secret",
    "Deployment",
    "PodDisruptionBudget",
    "ScaledObject",
    "TriggerAuthentication",
    "RabbitmqCluster",
    "Service",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# -- compose ---------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: str, environ: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR:-default}`` interpolation (the subset this repo uses)."""
    environ = environ or {}
    return _INTERPOLATION.sub(lambda m: environ.get(m.group(1)) or (m.group(2) or ""), value)


def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, interpolated with defaults."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): interpolate(str(v)) for k, v in env.items()}


def as_argv(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [interpolate(str(v)) for v in value]


def parse_duration(text: str | int | float) -> float:
    """Compose durations: ``45s``, ``1m30s``, ``500ms``, or plain seconds."""
    if isinstance(text, int | float):
        return float(text)
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts, f"not a duration: {text!r}"
    for number, unit in parts:
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


# -- Dockerfile ------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def _logical_lines(text: str) -> Iterator[str]:
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        yield buffer + line
        buffer = ""
    if buffer:
        yield buffer


def dockerfile_stages(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, each with its instructions (ARGs substituted)."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
            continue
        if keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, alias))
            continue
        assert stages, f"{keyword} before FROM in {path}"
        stages[-1].instructions.append((keyword, rest))
    return args, stages


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD; fails for the shell form."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def dockerfile_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            if sep:
                env[key] = value
    return env


def healthcheck_command(stage: Stage) -> list[str]:
    args = stage.last("HEALTHCHECK")
    assert args, "no HEALTHCHECK"
    _, _, command = args.partition("CMD ")
    return exec_form(command.strip())


# -- kustomize -------------------------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    data = load_yaml(K8S_DIR / "kustomization.yaml")
    assert isinstance(data, dict)
    return data


def render_with_kubectl() -> list[dict[str, Any]] | None:
    """``kubectl kustomize deploy/k8s`` parsed, or None when kubectl is not installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_with_loader() -> list[dict[str, Any]]:
    """The same resources, namespace and image override applied in Python (no kubectl)."""
    spec = kustomization()
    images = {i["name"]: i for i in spec.get("images", [])}
    documents: list[dict[str, Any]] = []
    for resource in spec["resources"]:
        for doc in load_yaml_all(K8S_DIR / resource):
            if spec.get("namespace") and doc["kind"] in NAMESPACED:
                doc["metadata"]["namespace"] = spec["namespace"]
            for container in _containers(doc):
                name = container["image"].split(":")[0]
                override = images.get(name)
                if override:
                    container["image"] = f"{override.get('newName', name)}:{override['newTag']}"
            documents.append(doc)
    return documents


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc.get("kind") != "Deployment":
        return []
    containers: list[dict[str, Any]] = doc["spec"]["template"]["spec"]["containers"]
    return containers


def rendered() -> list[dict[str, Any]]:
    return render_with_kubectl() or render_with_loader()


def one(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in documents
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]
