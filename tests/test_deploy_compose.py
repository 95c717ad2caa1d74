"""docker/: the compose file validates with docker-compose, secrets stay out of git, and
Prometheus and Grafana are wired to what the compose file runs."""

from __future__ import annotations

import json
import os
import subprocess
import time
import zipfile

import requests
import yaml

from tests.deploy_kit import DOCKER, ROOT, SPRIM_SERVICES, compose_config, env_example, mounts
from tests.harness.orthanc import free_port


def test_compose_config_validates(tmp_path):
    cfg = compose_config(tmp_path)
    services = cfg["services"]
    assert set(services) == {
        "rabbitmq", "postgres", "orthanc", "api", "worker", "watch", "listen", "flower",
        "prometheus", "grafana",
    }  # fmt: skip
    for name in SPRIM_SERVICES:
        s = services[name]
        assert s["image"] == "sprim:latest" and s["build"]["dockerfile"] == "docker/Dockerfile"
        env = s["environment"]
        assert "@rabbitmq:5672/" in env["SPRIM_BROKER_URL"]
        assert "@postgres:5432/" in env["SPRIM_JOB_STORE_URL"]
        assert env["SPRIM_WATCH_URL"] == "http://orthanc:8042"
        assert json.loads(env["SPRIM_ARCHIVES"]) == {"orthanc": "http://orthanc:8042/dicom-web"}
        assert env["SPRIM_ARCHIVE_ORTHANC_USERNAME"] and "SPRIM_ARCHIVE_URL" not in env
        assert set(s["depends_on"]) == {"rabbitmq", "postgres", "orthanc"}
    assert [services[n]["command"][:2] for n in ("api", "worker", "watch", "listen")] == [
        ["sprim", "serve"], ["sprim", "worker"], ["sprim", "watch"], ["sprim", "listen"],
    ]  # fmt: skip
    worker = services["worker"]
    # scalable: no fixed container name, no host port
    assert "container_name" not in worker and "ports" not in worker
    assert worker["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    # workers read what `sprim listen` stores, at the same path
    listen_store = services["listen"]["environment"]["SPRIM_LISTEN_STORE"]
    assert mounts(worker)[listen_store] == mounts(services["listen"])[listen_store] == "incoming"
    assert services["prometheus"]["secrets"][0]["source"] == "prometheus_api_token"


def test_real_env_files_and_secrets_are_ignored_examples_are_not():
    def ignored(path: str) -> bool:
        r = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        return r.returncode == 0

    for name in ("sprim", "rabbitmq", "postgres", "orthanc", "grafana"):
        assert ignored(f"docker/{name}.env")
        assert not ignored(f"docker/{name}.env.example")
    assert ignored("docker/secrets/prometheus-api-token")
    assert not ignored("docker/secrets/prometheus-api-token.example")


def test_prometheus_scrapes_every_sprim_process_compose_runs(tmp_path):
    services = compose_config(tmp_path)["services"]
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    # the API: its port, a '*' token (the same as in the committed examples)
    api = jobs["sprim-api"]
    cmd = services["api"]["command"]
    assert api["static_configs"][0]["targets"] == [f"api:{cmd[cmd.index('--port') + 1]}"]
    secret = api["authorization"]["credentials_file"]
    assert secret == "/run/secrets/prometheus_api_token"
    token = (DOCKER / "secrets" / "prometheus-api-token.example").read_text().strip()
    assert json.loads(env_example("sprim")["SPRIM_API_TOKENS"])[token] == "*"
    # every worker replica by DNS, the ingest processes: on their SPRIM_METRICS_PORT
    [dns] = jobs["sprim-worker"]["dns_sd_configs"]
    assert dns["names"] == ["worker"]
    assert str(dns["port"]) == services["worker"]["environment"]["SPRIM_METRICS_PORT"]
    targets = jobs["sprim-ingest"]["static_configs"][0]["targets"]
    assert targets == [f"{n}:{services[n]['environment']['SPRIM_METRICS_PORT']}"
                       for n in ("watch", "listen")]  # fmt: skip
    # RabbitMQ's plugin is enabled by the mounted file
    plugins = (DOCKER / "rabbitmq" / "enabled_plugins").read_text()
    assert "rabbitmq_prometheus" in plugins and jobs["rabbitmq"]["static_configs"]


def test_grafana_provisioning_matches_the_dashboard(tmp_path):
    services = compose_config(tmp_path)["services"]
    grafana = mounts(services["grafana"])
    ds = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"][0]
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in services
    provider = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "dashboards" / "sprim.yaml").read_text()
    )["providers"][0]
    assert grafana[provider["options"]["path"]].endswith("grafana/dashboards")
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "sprim.json").read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"]}
    uids |= {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    assert uids == {ds["uid"]}


def test_image_sources_are_in_the_build_context():
    """What the Dockerfile copies exists and is not excluded by .dockerignore."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
                assert f"!{src.rstrip('/')}/" in ignore or f"!{src}" in ignore, src


def test_the_installed_package_is_complete_and_serves(tmp_path):
    """What the image installs (`pip install .`, not the checkout): every file of the packages
    is in the wheel, and `sprim serve` from it answers /health, /metrics and the console."""
    r = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "pip"), "wheel", "-q", "--no-deps", "-w",
         str(tmp_path / "wheel"), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    [wheel] = (tmp_path / "wheel").glob("sprim-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", "pipelines", "workers", "tasks"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert [f for f in tracked if f not in names] == []
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a wheel is unpacked as it is installed
    port, token = free_port(), "deploy-test-admin"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPRIM_")}
    env.update(PYTHONPATH=str(site), SPRIM_HOME=str(tmp_path / "home"),
               SPRIM_API_TOKENS=json.dumps({token: "*"}))  # fmt: skip
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    serve = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "python"), "-c", "from tasks.main import main; main()",
         "serve", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(url + "/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "sprim serve did not answer"
            time.sleep(0.2)
        m = requests.get(url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert m.status_code == 200 and "sprim_job_store_up 1.0" in m.text
        assert requests.get(url + "/console/login", timeout=10).status_code == 200
        assert requests.get(url + "/console/static/console.css", timeout=10).status_code == 200
        # imported from the installed copy, not from this checkout
        out = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "python"), "-c", "import workers; print(workers.__file__)"],
            cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert out.startswith(str(site))
    finally:
        serve.terminate()
        serve.wait(timeout=30)
