"""docker-compose.yml without a Docker engine: parse it and check the topology (nginx in front of
three target replicas on one PostgreSQL, a detection worker, the attacker behind nginx),
healthchecks, start-up order, the 127.0.0.1 binding, that
no secret has a default, that nginx enforces the service's body limit, and that the attacker's
account can pay for everything `attacker run` buys there."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SECRET = re.compile(r"TOKEN|PASSWORD|KEY|SECRET", re.I)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def nginx_conf() -> str:
    return (ROOT / "deploy" / "nginx.conf").read_text()


def directive(conf: str, name: str) -> str:
    match = re.search(rf"^\s*{name}\s+([^;]+);", conf, re.M)
    assert match, f"nginx.conf has no {name}"
    return match.group(1).strip()


REPLICAS = ["target-1", "target-2", "target-3"]


def test_nginx_fronts_the_target_and_the_attacker_goes_through_it(
    compose: dict[str, Any], nginx_conf: str
) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", *REPLICAS, "detect", "nginx", "attacker"}
    for name in REPLICAS:
        assert "ports" not in services[name], "the service itself must not be published"
    mounts = {m.split(":")[1]: m.split(":")[0] for m in services["nginx"]["volumes"]}
    assert mounts["/etc/nginx/templates/default.conf.template"] == "./deploy/nginx.conf"
    upstream = re.search(r"upstream\s+(\w+)\s*\{([^}]*)\}", nginx_conf)
    assert upstream
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", upstream.group(2), re.M)
    assert servers == [(name, "8000") for name in REPLICAS]
    assert directive(nginx_conf, "proxy_pass") == f"http://{upstream.group(1)}"
    attack_url = urlparse(services["attacker"]["environment"]["ATTACK_URL"])
    assert attack_url.hostname == "nginx"
    assert str(attack_url.port) == directive(nginx_conf, "listen")


def test_replicas_and_the_detection_worker_share_postgresql_and_the_state_volume(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    postgres = services["postgres"]
    assert "ports" not in postgres, "the database must not be published"
    written = services["target-1"]["environment"]["TARGET_DATABASE_URL"]
    url = urlparse(re.sub(r"\$\{POSTGRES_PASSWORD:\?[^}]*\}", "password", written))
    assert (url.scheme, url.hostname, url.port, url.path) == (
        "postgresql",
        "postgres",
        5432,
        "/mlaas",
    )
    assert url.username == postgres["environment"]["POSTGRES_USER"]
    assert url.path.lstrip("/") == postgres["environment"]["POSTGRES_DB"]
    for name in [*REPLICAS, "detect"]:
        service = services[name]
        assert service["environment"] == services["target-1"]["environment"], name
        assert service["environment"]["TARGET_DETECTION_MODE"] == "worker", name
        assert sorted(service["volumes"]) == [
            "target-checkpoints:/data/checkpoints",
            "target-state:/data/state",
        ], name
    assert services["detect"]["command"] == ["target-service", "detect"]
    assert set(compose["volumes"]) == {"postgres-data", "target-state", "target-checkpoints"}


def test_the_published_port_is_bound_to_localhost_by_default(compose: dict[str, Any]) -> None:
    published = [port for svc in compose["services"].values() for port in svc.get("ports", [])]
    assert published == ["${TARGET_BIND:-127.0.0.1}:8000:8080"]


def test_healthchecks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    healthy = {"condition": "service_healthy"}
    for name in [*REPLICAS, "nginx"]:
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and any("/health" in part for part in test), name
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    # the first replica migrates the schema and trains the missing checkpoints alone
    assert services["target-1"]["depends_on"] == {"postgres": healthy}
    for name in ["target-2", "target-3", "detect"]:
        assert services[name]["depends_on"] == {"target-1": healthy}, name
    assert services["nginx"]["depends_on"] == dict.fromkeys(REPLICAS, healthy)
    assert services["attacker"]["depends_on"] == {"nginx": healthy}


def test_no_secret_has_a_default(compose: dict[str, Any]) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for match in re.finditer(r"\$\{(\w+)([^}]*)\}", text):
        name, rest = match.groups()
        if SECRET.search(name):
            assert rest.startswith(":?"), f"${{{name}{rest}}} must fail when unset, not default"
    secrets = 0
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if SECRET.search(key):
                secrets += 1
                assert str(value).startswith(f"${{{key}:?"), (key, value)
    # the admin token (replicas, detection worker, attacker) and PostgreSQL's password
    assert secrets == len(REPLICAS) + 3
    for name in [*REPLICAS, "detect"]:
        url = compose["services"][name]["environment"]["TARGET_DATABASE_URL"]
        assert ":${POSTGRES_PASSWORD:?" in url, "the database password must not default"


def test_nginx_limits_slow_clients_and_the_body_size_like_the_service(
    compose: dict[str, Any], nginx_conf: str
) -> None:
    for name in ("client_header_timeout", "client_body_timeout"):
        assert re.fullmatch(r"\d+s", directive(nginx_conf, name)), name
    assert directive(nginx_conf, "client_max_body_size") == "${TARGET_MAX_BODY_BYTES}"
    services = compose["services"]
    limit = services["target-1"]["environment"]["TARGET_MAX_BODY_BYTES"]
    assert services["nginx"]["environment"]["TARGET_MAX_BODY_BYTES"] == limit
    assert limit == "${TARGET_MAX_BODY_BYTES:-16777216}"  # the service's own default, 16 MiB


def test_the_attack_account_pays_for_both_methods_and_the_transfer_step() -> None:
    spec = importlib.util.spec_from_file_location(
        "compose_attack", ROOT / "scripts/compose_attack.py"
    )
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # 600 per method, then 20 seeds x 9 targets crafted, and as many noise probes
    assert script.attack_budget(600) == 2 * 600 + 2 * 20 * 9
    assert script.attack_budget(100, transfer_seeds=5) == 2 * 100 + 2 * 5 * 9
