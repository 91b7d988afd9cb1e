"""deploy/: the alert rules and the dashboard only use metrics Herald exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from prometheus_client import REGISTRY

from pipeline import metrics
from pipeline.ops.cli import cli
from pipeline.settings import REPO_ROOT, Settings

DEPLOY = REPO_ROOT / "deploy"


def exported() -> set[str]:
    assert metrics.INTENTS  # the module registers Herald's metrics on import
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    names = {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("herald_")
        for suffix in suffixes.get(family.type, ("",))
    }
    lag_source = (REPO_ROOT / "pipeline" / "web" / "lag.py").read_text()
    return names | set(re.findall(r'"(kafka_[a-z_]+)"', lag_source)) | {"up"}


def used(expression: str) -> set[str]:
    return set(re.findall(r"\b((?:herald|kafka)_[a-z_]+|up)\b(?=\s*[{\[)])", expression))


def test_alert_rules_are_well_formed_and_use_exported_metrics() -> None:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "herald-alerts.yml").read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in rules}
    assert {"HeraldWorkerDown", "HeraldConsumerLagGrowing", "HeraldDeadLetterSpike"} <= names
    assert "HeraldDeliveryFailureRatio" in names
    known = exported()
    for rule in rules:
        assert rule["labels"]["severity"] in {"page", "warn", "info"}
        assert rule["annotations"]["summary"]
        assert used(rule["expr"]) <= known, (rule["alert"], used(rule["expr"]) - known)


def test_dashboard_panels_use_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "herald-dashboard.json").read_text())
    known = exported()
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(expressions) >= 10
    for expression in expressions:
        assert used(expression), expression
        assert used(expression) <= known, (expression, used(expression) - known)


# --- compose, Kubernetes and the image -------------------------------------------------

COMPOSE_DIR = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
HERALD_IMAGE = re.compile(r"^herald(:|$)")
DEPLOYMENTS = ("herald-worker", "herald-api")
SECRET_KEY = re.compile(r"PASSWORD|TOKEN|SECRET|API_?KEY|CREDENTIAL", re.IGNORECASE)


def setting_names() -> set[str]:
    """Every environment variable Settings reads (HERALD_<FIELD> or its standard name)."""
    return {Settings.env_var(name) for name in Settings.model_fields}


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
    return doc


def herald_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in doc["services"].items() if HERALD_IMAGE.match(s["image"])}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The file or folder of this checkout that a compose bind mount shows at
    ``container_path`` (None when nothing is mounted there)."""
    volumes: list[str] = service.get("volumes", [])
    for volume in volumes:
        source, target = volume.split(":")[:2]
        if not source.startswith("."):
            continue  # a named volume
        if container_path == target or container_path.startswith(target + "/"):
            return (COMPOSE_DIR / source / container_path[len(target) :].lstrip("/")).resolve()
    return None


def k8s_docs() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [
        doc
        for resource in kustomization["resources"]
        for doc in yaml.safe_load_all((K8S / resource).read_text())
        if doc
    ]


def k8s(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def config_map() -> dict[str, str]:
    return {str(k): str(v) for k, v in k8s("ConfigMap", "herald-config")["data"].items()}


def pod_spec(kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = k8s(kind, name)["spec"]["template"]["spec"]
    return spec


def only_container(kind: str, name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec(kind, name)["containers"]
    assert len(containers) == 1
    return containers[0]


def runs_a_herald_command(words: list[str]) -> None:
    """``words`` is a complete `herald` command line whose options all exist."""
    command: click.Command = cli
    rest = list(words)
    while isinstance(command, click.Group):
        assert rest, words
        assert rest[0] in command.commands, words
        command = command.commands[rest.pop(0)]
    command.make_context("herald", rest)  # raises on an unknown option or argument


def literal_secrets(node: Any, where: str = "") -> list[str]:
    """Keys that look like secrets and carry a literal value (not a reference)."""
    found: list[str] = []
    if isinstance(node, dict):
        if "name" in node and "value" in node:  # a Kubernetes env entry
            node = {**node, str(node["name"]): node["value"]}
        for key, value in node.items():
            literal = isinstance(value, str | int) and not isinstance(value, bool)
            if literal and SECRET_KEY.search(str(key)) and not str(value).startswith("${"):
                found.append(f"{where}/{key}")
            found += literal_secrets(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            found += literal_secrets(item, f"{where}[{index}]")
    return found


def dockerfile() -> list[str]:
    """deploy/Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def dockerfile_env() -> dict[str, str]:
    pairs = [p for line in dockerfile() if line.startswith("ENV ") for p in line[4:].split()]
    return dict(pair.split("=", 1) for pair in pairs)


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match[1]) * (60 if match[2] == "m" else 1)


def partitions(profile: str) -> int:
    topics = yaml.safe_load((REPO_ROOT / "topologies" / "topics.yaml").read_text())
    return max(int(n) for n in topics["profiles"][profile]["groups"].values())


def test_compose_services_have_images_and_herald_commands() -> None:
    doc = compose()
    assert all(service.get("image") for service in doc["services"].values())
    herald = herald_services(doc)
    assert {"topics", "worker", "api", "smtp-sink"} <= set(herald)
    for service in herald.values():
        runs_a_herald_command(service["command"])
        build = service["build"]
        assert (COMPOSE_DIR / build["context"]).resolve() == REPO_ROOT
        assert (REPO_ROOT / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        assert service.get("init") is True  # SIGTERM reaches Python, not a bare PID 1
    assert herald["topics"]["command"] == ["topics", "apply"]
    assert herald["worker"]["command"] == ["worker"]
    assert herald["api"]["command"] == ["api"]


def test_compose_kafka_matches_the_pinned_broker_and_the_settings() -> None:
    doc = compose()
    kafka = doc["services"]["kafka"]
    pom = (DEPLOY / "local" / "kafka" / "pom.xml").read_text()
    version = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom)
    assert version
    assert kafka["image"] == f"apache/kafka:{version[1]}"
    broker = environment(kafka)
    assert set(broker["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert broker["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert broker["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    advertised = broker["KAFKA_ADVERTISED_LISTENERS"]
    registry = doc["services"]["schema-registry"]
    listeners = environment(registry)["SCHEMA_REGISTRY_LISTENERS"]
    for name, service in herald_services(doc).items():
        env = environment(service)
        assert f"//{env['KAFKA_BOOTSTRAP_SERVERS']}" in advertised, name
        url = env["SCHEMA_REGISTRY_URL"]
        assert url.startswith("http://schema-registry:"), name
        assert listeners.endswith(":" + url.rsplit(":", 1)[1]), name


def test_compose_start_order_uses_health_and_completion() -> None:
    doc = compose()
    services = doc["services"]
    assert services["kafka"]["healthcheck"]["test"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("worker", "api"):
        depends = services[name]["depends_on"]
        assert depends["topics"]["condition"] == "service_completed_successfully", name
        assert depends["schema-registry"]["condition"] == "service_healthy", name
        assert services["schema-registry"]["healthcheck"]["test"]


def test_compose_worker_scales_and_reports_readiness() -> None:
    doc = compose()
    worker = doc["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker  # a fixed host port would collide at --scale worker=N
    env = environment(worker)
    assert env["HERALD_METRICS_HOST"] == "0.0.0.0"
    port = env["HERALD_METRICS_PORT"]
    assert f"127.0.0.1:{port}/readyz" in " ".join(worker["healthcheck"]["test"])
    assert worker["depends_on"]["smtp-sink"]["condition"] == "service_healthy"
    sink = doc["services"]["smtp-sink"]["command"]
    assert env["HERALD_SMTP_HOST"] == "smtp-sink"
    assert sink[sink.index("--port") + 1] == env["HERALD_SMTP_PORT"]
    assert sink[sink.index("--host") + 1] == "0.0.0.0"
    defaults = Settings()
    assert seconds(worker["stop_grace_period"]) > defaults.kafka_ack_timeout_s
    api = environment(doc["services"]["api"])
    assert api["HERALD_API_HOST"] == "0.0.0.0"
    assert f"127.0.0.1:{api['HERALD_API_PORT']}/readyz" in " ".join(
        doc["services"]["api"]["healthcheck"]["test"]
    )


def test_compose_settings_are_real_and_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    known = setting_names()
    for name, service in herald_services(compose()).items():
        env = environment(service)
        assert set(env) <= known, (name, set(env) - known)
        with monkeypatch.context() as patched:
            for key, value in env.items():
                patched.setenv(key, value)
            Settings()  # every value passes the settings' validation


def test_compose_secrets_come_from_an_ignored_env_file() -> None:
    doc = compose()
    for name, service in herald_services(doc).items():
        assert service["env_file"] == [{"path": "herald.env", "required": False}], name
    assert "herald.env" in (COMPOSE_DIR / ".gitignore").read_text().split()
    example = [
        line.lstrip("# ").split("=", 1)
        for line in (COMPOSE_DIR / "herald.env.example").read_text().splitlines()
        if re.match(r"#? ?[A-Z_]+=", line)
    ]
    assert {"HERALD_API_TOKEN", "HERALD_OPERATOR_TOKEN", "HERALD_SMTP_PASSWORD"} <= {
        key for key, _ in example
    }
    assert {key for key, _ in example} <= setting_names()
    assert all(value.startswith("replace-with-") for _, value in example), example


def test_prometheus_scrapes_every_worker_and_loads_the_alerts() -> None:
    doc = compose()
    prometheus = doc["services"]["prometheus"]
    config_path = next(
        a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file=")
    )
    config_file = host_path(prometheus, config_path)
    assert config_file == COMPOSE_DIR / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_file.read_text())
    rules = [host_path(prometheus, path) for path in config["rule_files"]]
    assert rules == [DEPLOY / "prometheus" / "herald-alerts.yml"]

    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    alerts = (DEPLOY / "prometheus" / "herald-alerts.yml").read_text()
    assert set(re.findall(r'job="([^"]+)"', alerts)) <= set(jobs)
    worker_env = environment(doc["services"]["worker"])
    (discovery,) = jobs["herald-worker"]["dns_sd_configs"]
    assert discovery["type"] == "A"
    assert discovery["names"] == ["worker"]
    assert str(discovery["port"]) == worker_env["HERALD_METRICS_PORT"]
    api_port = environment(doc["services"]["api"])["HERALD_API_PORT"]
    assert jobs["herald-api"]["static_configs"] == [{"targets": [f"api:{api_port}"]}]
    for job in jobs.values():
        assert job["metrics_path"] == "/metrics"


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    doc = compose()
    grafana = doc["services"]["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning == COMPOSE_DIR / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in doc["services"]
    providers = [
        provider
        for file in sorted((provisioning / "dashboards").glob("*.yml"))
        for provider in yaml.safe_load(file.read_text())["providers"]
    ]
    folders = [host_path(grafana, p["options"]["path"]) for p in providers]
    assert DEPLOY / "grafana" in folders
    assert (DEPLOY / "grafana" / "herald-dashboard.json").is_file()


def test_kustomization_lists_every_manifest_and_no_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    docs = k8s_docs()
    kinds = {doc["kind"] for doc in docs}
    assert {"Namespace", "ConfigMap", "Job", "Deployment", "PodDisruptionBudget"} <= kinds
    assert "Secret" not in kinds  # created outside the repository
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization["namespace"], doc["kind"]


def test_k8s_settings_are_real_and_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    data = config_map()
    known = setting_names()
    assert set(data) <= known, set(data) - known
    assert data["HERALD_APP_ID"]  # a fixed consumer group across rollouts
    assert data["HERALD_TOPOLOGY_PROFILE"] == "production"
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    Settings()
    for kind, name in [("Job", "herald-topics"), *[("Deployment", d) for d in DEPLOYMENTS]]:
        container = only_container(kind, name)
        runs_a_herald_command(container["args"])
        names = {entry["name"] for entry in container.get("env", [])}
        assert {n for n in names if n.startswith("HERALD_")} <= known
        assert {"configMapRef": {"name": "herald-config"}} in container["envFrom"]


def test_k8s_pods_read_the_optional_secret_and_run_as_the_image_user() -> None:
    user = next(line.split()[1] for line in dockerfile() if line.startswith("USER "))
    for kind, name in [("Job", "herald-topics"), *[("Deployment", d) for d in DEPLOYMENTS]]:
        spec = pod_spec(kind, name)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert str(spec["securityContext"]["runAsUser"]) == user.split(":")[0], name
        container = only_container(kind, name)
        assert container["resources"]["requests"], name
        assert container["resources"]["limits"], name
    for name in DEPLOYMENTS:
        secret = {"secretRef": {"name": "herald-secrets", "optional": True}}
        assert secret in only_container("Deployment", name)["envFrom"], name


def test_k8s_worker_rolls_over_without_losing_capacity() -> None:
    worker = k8s("Deployment", "herald-worker")
    assert worker["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert 1 <= worker["spec"]["replicas"] <= partitions("production")
    port = config_map()["HERALD_METRICS_PORT"]
    container = only_container("Deployment", "herald-worker")
    (metrics_port,) = container["ports"]
    assert (metrics_port["name"], str(metrics_port["containerPort"])) == ("metrics", port)
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == port
    assert annotations["prometheus.io/path"] == "/metrics"
    defaults = Settings()
    grace = pod_spec("Deployment", "herald-worker")["terminationGracePeriodSeconds"]
    assert grace >= defaults.kafka_ack_timeout_s + defaults.smtp_timeout_s
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec("Deployment", "herald-worker")["volumes"]}
    assert "emptyDir" in volumes[mounts[config_map()["HERALD_STATE_DIR"]]]
    text = " ".join(line.lstrip("# ") for line in (K8S / "worker-deployment.yaml").open())
    assert f"{partitions('production')} in the production profile" in " ".join(text.split())


def test_k8s_disruption_budget_and_api_service_select_their_pods() -> None:
    worker_labels = k8s("Deployment", "herald-worker")["spec"]["template"]["metadata"]["labels"]
    budget = k8s("PodDisruptionBudget", "herald-worker")["spec"]
    assert budget["selector"]["matchLabels"].items() <= worker_labels.items()
    api = k8s("Deployment", "herald-api")
    api_labels = api["spec"]["template"]["metadata"]["labels"]
    service = k8s("Service", "herald-api")["spec"]
    assert service["selector"].items() <= api_labels.items()
    assert not service["selector"].items() <= worker_labels.items()
    container = only_container("Deployment", "herald-api")
    (http,) = container["ports"]
    assert {p["targetPort"] for p in service["ports"]} == {http["name"]}
    assert str(http["containerPort"]) == config_map()["HERALD_API_PORT"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert api["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(
        http["containerPort"]
    )


def test_k8s_images_are_the_one_kustomize_sets() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    for kind, name in [("Job", "herald-topics"), *[("Deployment", d) for d in DEPLOYMENTS]]:
        assert only_container(kind, name)["image"].split(":")[0] == image["name"]


def test_no_manifest_holds_a_secret_value() -> None:
    found = literal_secrets(compose(), "compose") + literal_secrets(k8s_docs(), "k8s")
    for path in sorted((COMPOSE_DIR / "grafana").rglob("*.yml")):
        found += literal_secrets(yaml.safe_load(path.read_text()), path.name)
    found += [f"Dockerfile/{key}" for key in dockerfile_env() if SECRET_KEY.search(key)]
    assert found == []
    assert literal_secrets({"HERALD_SMTP_PASSWORD": "x"}) == ["/HERALD_SMTP_PASSWORD"]
    assert literal_secrets([{"name": "HERALD_API_TOKEN", "value": "x"}])


def test_image_installs_pinned_and_points_settings_at_its_data() -> None:
    lines = dockerfile()
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert bases == ["python:3.11-slim", "python:3.11-slim"]
    assert any("pip install -c constraints.txt ." in line for line in lines)
    env = dockerfile_env()
    assert {key for key in env if key.startswith("HERALD_")} <= setting_names()
    copies = {
        line.split()[-1]: line.split()[-2]
        for line in lines
        if line.startswith("COPY ") and "--from" not in line
    }
    for variable, folder in [
        ("HERALD_TOPOLOGY_DIR", "topologies"),
        ("HERALD_SCHEMAS_DIR", "schemas"),
        ("HERALD_TEMPLATES_DIR", "templates"),
    ]:
        assert copies[env[variable]] == folder, variable
    assert env["HERALD_METRICS_HOST"] == "0.0.0.0"
    user = next(line.split()[1] for line in lines if line.startswith("USER "))
    uid = user.split(":")[0]
    assert uid.isdigit()  # numeric, so Kubernetes' runAsNonRoot can check it
    assert int(uid) != 0
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".state"} <= set(ignored)
