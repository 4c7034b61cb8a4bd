"""The deployment files say what the worker needs: checked by parsing (and rendering) them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from brokerjobs.cli import load_app
from brokerjobs.settings import Settings
from tests.deploy.manifests import (
    COMPOSE_FILE,
    DOCKERFILE,
    K8S_DIR,
    NAMESPACED,
    REPO,
    Stage,
    as_argv,
    compose,
    compose_environment,
    dockerfile_env,
    dockerfile_stages,
    exec_form,
    healthcheck_command,
    kustomization,
    load_yaml_all,
    one,
    parse_duration,
    render_with_kubectl,
    render_with_loader,
    rendered,
)

SETTINGS_ENV = {f"BROKERJOBS_{name.upper()}" for name in Settings.model_fields}


def settings_from(env: dict[str, str], url: str | None = None) -> Settings:
    """Validate BROKERJOBS_* values exactly as the worker would read them from its environment."""
    values = {
        key.removeprefix("BROKERJOBS_").lower(): value
        for key, value in env.items()
        if key.startswith("BROKERJOBS_")
    }
    if url is not None:
        values["url"] = url
    return Settings.model_validate(values)


# -- Dockerfile ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages()[1]


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_dockerfile_is_multi_stage_on_slim_python_with_a_wheel_installed_into_a_venv(
    stages: list[Stage],
) -> None:
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", stage.base), stage.base
    build, final = stages[0], stages[-1]
    assert any("pip wheel" in run for run in build.all("RUN"))
    install = " ".join(final.all("RUN"))
    assert "python -m venv /opt/venv" in install
    assert "--no-index" in install and "from=build" in install  # only the built wheels
    assert dockerfile_env(final)["PATH"].startswith("/opt/venv/bin:")


def test_dockerfile_runs_the_worker_as_non_root_with_sigterm_and_a_healthcheck(
    final: Stage,
) -> None:
    user = final.last("USER")
    assert user is not None
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid"
    assert not gid or int(gid) != 0
    assert exec_form(final.last("ENTRYPOINT") or "") == ["brokerjobs", "worker"]
    cmd = exec_form(final.last("CMD") or "")
    assert len(cmd) == 1
    load_app(cmd[0])  # the app path is importable from the image's WORKDIR (examples/ copied in)
    assert final.last("WORKDIR") == "/app"
    assert final.last("STOPSIGNAL") == "SIGTERM"
    assert healthcheck_command(final)[:2] == ["brokerjobs", "health"]


def test_dockerfile_exposes_the_health_port_and_configures_only_through_env(final: Stage) -> None:
    env = dockerfile_env(final)
    assert final.last("EXPOSE") == env["BROKERJOBS_HEALTH_PORT"]
    assert {k for k in env if k.startswith("BROKERJOBS_")} <= SETTINGS_ENV
    settings_from(env)  # the image's defaults are valid settings
    copied = " ".join(final.all("COPY"))
    assert ".env" not in copied and "secret" not in copied.lower()


def test_dockerfile_copies_only_files_that_exist_and_are_not_dockerignored(
    stages: list[Stage],
) -> None:
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore  # everything else is excluded from the build context
    for stage in stages:
        for copy in stage.all("COPY"):
            words = [w for w in copy.split() if not w.startswith("--")]
            if "--from" in copy:
                continue
            for source in words[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: no such file in the repo"
                assert source.rstrip("/") in allowed, f"COPY {source} is dockerignored"


# -- compose ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    services: dict[str, Any] = compose()["services"]
    return services


def test_compose_rabbitmq_is_a_management_image_with_a_healthcheck_and_a_named_volume(
    services: dict[str, Any],
) -> None:
    rabbit = services["rabbitmq"]
    assert re.fullmatch(r"rabbitmq:(3\.13|4\.\d+)(\.\d+)?-management(-alpine)?", rabbit["image"])
    test = rabbit["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "rabbitmq-diagnostics"
    volume, _, target = rabbit["volumes"][0].partition(":")
    assert target == "/var/lib/rabbitmq"
    assert volume in compose()["volumes"], "the broker's data must be in a named volume"
    for mapping in rabbit.get("ports", []):
        assert str(mapping).startswith("127.0.0.1:"), "publish broker ports on loopback only"


def test_compose_worker_is_scalable_healthchecked_and_waits_for_a_healthy_broker(
    services: dict[str, Any],
) -> None:
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed name breaks --scale worker=N"
    assert "ports" not in worker, "a fixed host port breaks --scale worker=N"
    assert (REPO / worker["build"]["context"] / worker["build"]["dockerfile"]) == DOCKERFILE
    assert worker["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    env = compose_environment(worker)
    assert {k for k in env if k.startswith("BROKERJOBS_")} <= SETTINGS_ENV
    settings = settings_from(env)
    assert str(settings.health_port) in [str(p) for p in worker["expose"]]
    assert worker["healthcheck"]["test"][1:3] == ["brokerjobs", "health"]
    _, stages = dockerfile_stages()
    assert as_argv(worker["command"]) == exec_form(stages[-1].last("CMD") or "")
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert parse_duration(worker["stop_grace_period"]) > settings.shutdown_grace


def test_compose_producer_runs_the_demo_producer_after_the_worker_is_healthy(
    services: dict[str, Any],
) -> None:
    producer = services["producer"]
    assert as_argv(producer["entrypoint"]) == ["python", "-m", "examples.demo_producer"]
    assert as_argv(producer["command"])[0] == "--count"
    assert producer["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert producer["depends_on"]["worker"]["condition"] == "service_healthy"
    assert compose_environment(producer)["BROKERJOBS_URL"].startswith("amqp://")
    assert producer.get("restart") == "no"


def test_compose_optional_services_sit_behind_profiles_and_their_files_exist(
    services: dict[str, Any],
) -> None:
    assert services["otel-collector"]["profiles"] == ["otel"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE_FILE.parent / source).is_file(), f"{name}: {source} missing"


# -- Kubernetes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return rendered()


def _config(docs: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap")["data"]
    return data


def _pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def test_kustomization_lists_every_manifest_in_the_folder_and_each_parses() -> None:
    listed = kustomization()["resources"]
    on_disk = sorted(p.name for p in K8S_DIR.iterdir() if p.suffix in (".yaml", ".yml"))
    assert sorted([*listed, "kustomization.yaml"]) == on_disk
    for resource in listed:
        documents = load_yaml_all(K8S_DIR / resource)
        assert documents, f"{resource} is empty"
        for doc in documents:
            assert doc.get("apiVersion") and doc.get("kind"), resource
            assert doc["metadata"]["name"], resource


def test_the_base_renders_and_every_namespaced_object_lands_in_the_namespace(
    docs: list[dict[str, Any]],
) -> None:
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "Namespace",
            "ConfigMap",
            "Secret",
            "Deployment",
            "PodDisruptionBudget",
            "PodDisruptionBudget",
            "TriggerAuthentication",
            "ScaledObject",
            "RabbitmqCluster",
        ]
    )
    namespace = kustomization()["namespace"]
    assert one(docs, "Namespace")["metadata"]["name"] == namespace
    for doc in docs:
        if doc["kind"] in NAMESPACED:
            assert doc["metadata"].get("namespace") == namespace, doc["metadata"]["name"]


def test_kubectl_and_the_python_loader_render_the_same_objects() -> None:
    by_kubectl = render_with_kubectl()
    if by_kubectl is None:
        pytest.skip("kubectl is not installed; the other tests used the Python loader")
    ids = sorted((d["kind"], d["metadata"]["name"]) for d in by_kubectl)
    assert ids == sorted((d["kind"], d["metadata"]["name"]) for d in render_with_loader())
    image = one(by_kubectl, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    override = kustomization()["images"][0]
    assert image == f"{override.get('newName', override['name'])}:{override['newTag']}"


def test_configmap_and_secret_are_valid_worker_settings(docs: list[dict[str, Any]]) -> None:
    config = _config(docs)
    assert set(config) <= SETTINGS_ENV, set(config) - SETTINGS_ENV
    secret = one(docs, "Secret")["stringData"]
    assert set(secret) == {"BROKERJOBS_URL"}
    assert "CHANGE-ME" in secret["BROKERJOBS_URL"], "the committed Secret holds placeholders only"
    settings = settings_from({**config, **secret})
    assert settings.health_port is not None


def test_deployment_probes_hit_the_health_port(docs: list[dict[str, Any]]) -> None:
    config = _config(docs)
    (container,) = _pod(docs)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expected = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        port = ports.get(get["port"], get["port"])
        assert str(port) == config["BROKERJOBS_HEALTH_PORT"], probe
    _, stages = dockerfile_stages()
    assert str(ports["health"]) == stages[-1].last("EXPOSE")


def test_deployment_grace_period_outlasts_a_job_and_the_drain(docs: list[dict[str, Any]]) -> None:
    settings = settings_from(_config(docs), url="amqp://u:p@h:5672/")
    grace = _pod(docs)["terminationGracePeriodSeconds"]
    assert grace > settings.job_timeout + settings.shutdown_grace
    rabbit = one(docs, "RabbitmqCluster")["spec"]["rabbitmq"]["additionalConfig"]
    assert (found := re.search(r"consumer_timeout\s*=\s*(\d+)", rabbit)), rabbit
    assert int(found.group(1)) / 1000 > settings.job_timeout  # consumer_timeout is in ms


def test_deployment_runs_non_root_with_resources_and_env_from_configmap_and_secret(
    docs: list[dict[str, Any]],
) -> None:
    pod = _pod(docs)
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    _, stages = dockerfile_stages()
    assert str(pod["securityContext"]["runAsUser"]) == (stages[-1].last("USER") or "").split(":")[0]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][section]), section
    refs = {
        ("ConfigMap" if "configMapRef" in ref else "Secret"): next(iter(ref.values()))["name"]
        for ref in container["envFrom"]
    }
    assert refs["ConfigMap"] == one(docs, "ConfigMap")["metadata"]["name"]
    assert refs["Secret"] == one(docs, "Secret")["metadata"]["name"]
    assert container["image"] and ":" in container["image"]
    load_app(container["args"][0])


def test_worker_pdb_selects_the_deployment_pods(docs: list[dict[str, Any]]) -> None:
    deployment = one(docs, "Deployment")
    pdb = one(docs, "PodDisruptionBudget", deployment["metadata"]["name"])
    selector = pdb["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert ("maxUnavailable" in pdb["spec"]) != ("minAvailable" in pdb["spec"])


def test_scaledobject_scales_the_deployment_on_its_queues(docs: list[dict[str, Any]]) -> None:
    deployment = one(docs, "Deployment")
    scaled = one(docs, "ScaledObject")["spec"]
    target = scaled["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == (
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    assert scaled["minReplicaCount"] >= 1
    assert scaled["maxReplicaCount"] >= scaled["minReplicaCount"]
    app = load_app(deployment["spec"]["template"]["spec"]["containers"][0]["args"][0])
    auth = one(docs, "TriggerAuthentication")
    queues = set()
    for trigger in scaled["triggers"]:
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert int(trigger["metadata"]["value"]) > 0
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        queues.add(trigger["metadata"]["queueName"])
    assert queues == set(app.queues), "one trigger per main queue of the app"
    secret = one(docs, "Secret")
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host"
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]


def test_rabbitmq_cluster_has_three_replicas_and_a_pdb(docs: list[dict[str, Any]]) -> None:
    cluster = one(docs, "RabbitmqCluster")
    assert cluster["apiVersion"] == "rabbitmq.com/v1beta1"
    assert cluster["spec"]["replicas"] == 3
    assert re.fullmatch(r"rabbitmq:(3\.13|4\.\d+)[\w.-]*", cluster["spec"]["image"])
    pdb = one(docs, "PodDisruptionBudget", cluster["metadata"]["name"])
    # The Cluster Operator labels the pods app.kubernetes.io/name=<cluster name>.
    assert pdb["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": cluster["metadata"]["name"]
    }
    assert pdb["spec"]["maxUnavailable"] == 1
    host = re.search(r"@([^:/]+)", one(docs, "Secret")["stringData"]["BROKERJOBS_URL"])
    assert host is not None
    assert host.group(1).split(".")[0] == cluster["metadata"]["name"], "URL points at its Service"


def test_every_file_under_deploy_is_used() -> None:
    referenced = {"Dockerfile", "Dockerfile.dockerignore", "k8s"}
    referenced |= {
        Path(str(v).split(":")[0]).name
        for s in compose()["services"].values()
        for v in s.get("volumes", [])
        if str(v).startswith("./deploy/")
    }
    assert {p.name for p in (REPO / "deploy").iterdir()} <= referenced


def test_the_overlay_in_docs_sets_the_image_and_drops_the_placeholder_secret(
    tmp_path: Path,
) -> None:
    """The production overlay shown in docs/deployment.md renders as the page says."""
    if render_with_kubectl() is None:
        pytest.skip("kubectl is not installed")
    text = (REPO / "docs" / "deployment.md").read_text()
    block = re.search(r"```yaml\n(# overlays/prod/kustomization.yaml\n.*?)```", text, re.S)
    assert block is not None, "the overlay example is missing from docs/deployment.md"
    overlay = tmp_path / "overlays" / "prod"
    overlay.mkdir(parents=True)
    (tmp_path / "deploy").symlink_to(K8S_DIR.parent)
    (overlay / "kustomization.yaml").write_text(block.group(1))
    result = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert not [d for d in docs if d["kind"] == "Secret"]
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/shop-worker:1.4.2"
    assert one(docs, "ConfigMap")["data"]["BROKERJOBS_PREFETCH"] == "20"
