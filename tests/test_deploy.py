"""The deployment files agree with each other and with the node: every manifest parses, every
XRAYAGE_* variable is a config key that loads, and the ports, image, roles, volumes, secrets,
probes and the autoscaler's metric are the ones the node and the other files use."""

from __future__ import annotations

import configparser
import re
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from node.config import Settings, load_settings
from node.metrics import registry_for
from node.service import ROLES
from storage import Database
from tests.servers import NodeProcess, free_port, wait_until

DEPLOY = Path(__file__).parents[1] / "deploy"
EXAMPLE = DEPLOY / "xrayage.example.toml"
IMAGE_CONFIG = "/etc/xrayage/xrayage.toml"


def _documents() -> list[dict[str, Any]]:
    listed = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml")
                                    if p.name != "kustomization.yaml")  # fmt: skip
    return [d for name in listed for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text())]


def _named(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _documents() if d["kind"] == kind}


def _dockerfile_env() -> dict[str, str]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    pairs = [p for line in text.splitlines() if line.startswith("ENV ") for p in line[4:].split()]
    return dict(p.split("=", 1) for p in pairs)


def _settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The example config as a container sees it: the image's ENV, then the manifest's."""
    with monkeypatch.context() as m:
        for key, value in (_dockerfile_env() | env).items():
            if key.startswith("XRAYAGE_"):
                m.setenv(key, value)
        return load_settings(EXAMPLE)


def _container_env(container: dict[str, Any]) -> dict[str, str]:
    config_maps = _named("ConfigMap")
    env = {}
    for source in container.get("envFrom", []):
        env |= config_maps[source["configMapRef"]["name"]]["data"]
    for var in container.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = _named("Secret")[ref["name"]]["stringData"][ref["key"]]
        else:
            env[var["name"]] = var["value"]
    return env


def test_dockerfile_runs_the_example_config_as_non_root_with_a_health_check() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:[\d.]+-runtime-", text, re.M)
    assert re.search(r"^USER 10001$", text, re.M)
    assert f"COPY deploy/xrayage.example.toml {IMAGE_CONFIG}" in text
    settings = load_settings(EXAMPLE)
    env = _dockerfile_env()
    assert re.search(rf"^EXPOSE {settings.node.port} {env['XRAYAGE_HTTP__PORT']}$", text, re.M)
    assert f"127.0.0.1:{env['XRAYAGE_HTTP__PORT']}/healthz" in text
    assert f'CMD ["serve", "--config", "{IMAGE_CONFIG}", "--role", "all"]' in text


def test_kubernetes_roles_fit_together(monkeypatch: pytest.MonkeyPatch) -> None:
    deployments = _named("Deployment")
    roles = {}
    claims = _named("PersistentVolumeClaim")
    for name, d in deployments.items():
        pod = d["spec"]["template"]
        assert d["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        [c] = pod["spec"]["containers"]
        assert c["args"][:3] == ["serve", "--config", IMAGE_CONFIG]
        roles[c["args"][4]] = d
        settings = _settings(_container_env(c), monkeypatch)  # every override is a real key
        assert settings.database_url.startswith("postgresql+psycopg://")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["http"] == settings.http.port and settings.http.host == "0.0.0.0"
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(settings.http.port)
        [mount] = c["volumeMounts"]
        [volume] = pod["spec"]["volumes"]
        assert (
            mount["name"] == volume["name"]
            and volume["persistentVolumeClaim"]["claimName"] in claims
        )
        assert settings.storage.path.is_relative_to(mount["mountPath"])
        assert settings.model.cache_dir is not None
        assert settings.model.cache_dir.is_relative_to(mount["mountPath"])
        if name == "xrayage-receive":
            assert ports["dicom"] == settings.node.port
    assert sorted(roles) == sorted(ROLES)  # every role runs somewhere
    assert roles["schedule"]["spec"]["replicas"] == 1
    assert roles["schedule"]["spec"]["strategy"]["type"] == "Recreate"
    [infer] = roles["infer"]["spec"]["template"]["spec"]["containers"]
    assert infer["resources"]["limits"]["nvidia.com/gpu"] >= 1

    [service] = _named("Service")["xrayage"]["spec"]["ports"]
    receive = roles["receive"]["spec"]["template"]
    assert _named("Service")["xrayage"]["spec"]["selector"] == receive["metadata"]["labels"]
    assert service["targetPort"] == "dicom" and service["port"] == load_settings(EXAMPLE).node.port

    images = {c["image"] for d in (*deployments.values(), *_named("Job").values())
              for c in d["spec"]["template"]["spec"]["containers"]}  # fmt: skip
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert images == {compose["services"]["xrayage"]["image"]}


def test_the_autoscaler_watches_a_metric_the_node_exports(tmp_path: Path) -> None:
    [scaler] = [d for d in _documents() if d["kind"] == "ScaledObject"]
    assert scaler["spec"]["scaleTargetRef"]["name"] == "xrayage-infer"
    [trigger] = scaler["spec"]["triggers"]
    metric = re.search(r"xrayage_\w+", trigger["metadata"]["query"])
    assert metric is not None
    db = Database.sqlite_in(tmp_path)
    db.create_schema()
    exported = {m.name for m in registry_for(db).collect()}
    db.dispose()
    assert metric.group() in exported


def test_setup_job_and_compose_migrate_before_the_node_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    [job] = _named("Job").values()
    [c] = job["spec"]["template"]["spec"]["containers"]
    assert c["args"][0].startswith(f"xrayage db upgrade --config {IMAGE_CONFIG} && ")
    assert "xrayage model pull riken-senet154" in c["args"][0]
    config_map = _named("ConfigMap")["xrayage-env"]["data"]
    assert config_map["XRAYAGE_MODEL__WEIGHTS"] == "riken-senet154"  # the weights it pulled

    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    node = services["xrayage"]
    settings = _settings(node["environment"], monkeypatch)
    assert settings.model.weights == "riken-senet154"
    assert f"{settings.node.port}:{settings.node.port}" in node["ports"]
    assert f"127.0.0.1:{settings.http.port}:{settings.http.port}" in node["ports"]
    assert node["depends_on"]["setup"]["condition"] == "service_completed_successfully"
    assert services["setup"]["command"][0].startswith("xrayage db upgrade")
    # Orthanc, the demo PACS, knows the node, and the node delivers to Orthanc.
    orthanc = services["orthanc"]["environment"]
    modalities = yaml.safe_load(orthanc["ORTHANC__DICOM_MODALITIES"])
    assert [settings.node.ae_title, "xrayage", settings.node.port] in modalities.values()
    [pacs] = settings.destinations
    assert (pacs.ae_title, pacs.host) == (orthanc["ORTHANC__DICOM_AET"], "orthanc")
    user = services["postgres"]["environment"]
    assert settings.database_url == (
        f"postgresql+psycopg://{user['POSTGRES_USER']}:{user['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{user['POSTGRES_DB']}"
    )


def test_systemd_unit_runs_a_role_per_instance() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(DEPLOY / "systemd" / "xrayage@.service")
    service = unit["Service"]
    assert service["ExecStart"].endswith(f"xrayage serve --config {IMAGE_CONFIG} --role %i")
    assert service["User"] == "xrayage" and service["KillSignal"] == "SIGTERM"
    assert "xrayage@all" in (DEPLOY / "systemd" / "xrayage@.service").read_text()


def test_the_example_config_copied_as_it_is_starts_and_says_what_to_fill_in(
    tmp_path: Path,
) -> None:
    """A user who copies the example gets a node that starts; the log names what is still to
    fill in, and setting the HTTP port alone serves the pages with a token made for them."""
    config = tmp_path / "xrayage.toml"
    config.write_text(EXAMPLE.read_text())
    port, http = free_port(), free_port()
    node = NodeProcess(
        config, port, tmp_path / "node.log", http_port=http,
        env={"XRAYAGE_STORAGE__PATH": str(tmp_path / "data"), "XRAYAGE_NODE__PORT": str(port)},
    )  # fmt: skip
    node.start()
    try:
        wait_until(lambda: "no [retro] peer" in node.log.read_text(), 30, "the start's warnings")
        log = node.log.read_text()
        for said in ("no [model] weights configured", "no [[destinations]]", "no [retro] peer",
                     f"take the token in {tmp_path / 'data' / 'http-token'}"):  # fmt: skip
            assert said in log, said
        token_file = tmp_path / "data" / "http-token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        page = f"http://127.0.0.1:{http}/api/instances"
        assert requests.get(page, timeout=10).status_code == 401
        answer = requests.get(page, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert answer.status_code == 200 and answer.json()["instances"] == []
    finally:
        node.stop()
    assert EXAMPLE.read_text().count("TO FILL IN") == 4
