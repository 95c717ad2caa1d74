"""docker/compose.yaml run as host processes: every sprim service with its exact command line
and environment, one real CT study through storescu -> Orthanc -> watch -> worker -> outputs
in Orthanc, and every metrics endpoint answering.

No Docker engine runs here, so the containers' names and paths are substituted for the host's:
rabbitmq -> 127.0.0.1:5672 with a vhost of this test, postgres -> a database of this test,
orthanc -> the test harness Orthanc (tests/harness/orthanc.py) configured with docker/orthanc.json
and the users of orthanc.env.example, container ports -> free ports, container folders -> temp
folders, the image's installed package -> this checkout. Everything else is as compose says.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy_kit import (
    DOCKER,
    ROOT,
    SPRIM_SERVICES,
    compose_config,
    env_example,
    image_env,
)
from tests.harness.fixtures import CT_SERIES
from tests.harness.orthanc import DICOMWEB_PLUGIN, OrthancServer, free_port, orthanc_available
from tests.platform_kit import (
    VENV_BIN,
    drop_pg_db,
    drop_vhost,
    make_pg_db,
    make_vhost,
    rabbit_ready,
)

pytestmark = pytest.mark.integration
N_SLICES = 30  # a real CT volume the default rules process (they want >= 20 images)


class Host:
    """The host's stand-ins for the compose network, and the substitutions they need."""

    def __init__(self, tmp: Path, vhost: str, pg_url: str, orthanc: OrthancServer) -> None:
        self.tmp, self.vhost, self.pg_url, self.orthanc = tmp, vhost, pg_url, orthanc
        self.ports: dict[tuple[str, str], int] = {}

    def port(self, service: str, container_port: str) -> int:
        return self.ports.setdefault((service, container_port), free_port())

    def value(self, service: str, v: str) -> str:
        v = re.sub(r"amqp://[^@/]*@rabbitmq:5672/\w*",
                   f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}", v)  # fmt: skip
        v = re.sub(r"postgresql\+psycopg://[^@/]*@postgres:5432/\w*", self.pg_url, v)
        v = v.replace("http://orthanc:8042", self.orthanc.url)
        v = v.replace("/var/lib/sprim/incoming", str(self.tmp / "incoming"))
        v = v.replace("/var/lib/sprim", str(self.tmp / service))
        v = v.replace("/tmp/sprim-metrics", str(self.tmp / f"{service}-metrics"))
        return v

    def env(self, service: str, compose_env: dict) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SPRIM_", "PROMETHEUS_", "FLOWER_"))}  # fmt: skip
        env.update({k: self.value(service, v) for k, v in image_env().items()})
        env.update({k: self.value(service, str(v)) for k, v in compose_env.items()})
        if "SPRIM_METRICS_PORT" in env:
            env["SPRIM_METRICS_PORT"] = str(self.port(service, env["SPRIM_METRICS_PORT"]))
        # the image's installed sprim -> this checkout's, with the venv's executables
        env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
        env["PYTHONPATH"] = str(ROOT)
        return env

    def command(self, service: str, cmd: list[str]) -> list[str]:
        out = []
        for i, arg in enumerate(cmd):
            if i and cmd[i - 1] == "--port":
                arg = str(self.port(service, arg))
            elif arg.startswith("--port="):
                arg = f"--port={self.port(service, arg.split('=', 1)[1])}"
            out.append(arg)
        return out


class Process:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], tmp: Path) -> None:
        self.name, self.log = name, tmp / f"{name}.log"
        (tmp / name).mkdir(exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=tmp / name, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> None:
        assert self.proc.poll() is None, f"{self.name} exited:\n{self.tail()}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass


def wait(pred, timeout: float, what: str, *procs: Process, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            p.alive()
        v = pred()
        if v:
            return v
        logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)
        assert time.monotonic() < deadline, f"timeout waiting for {what}\n{logs}"
        time.sleep(step)


def answers(url: str, **kw) -> bool:
    try:
        return requests.get(url, timeout=5, **kw).ok
    except requests.ConnectionError:
        return False


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def orthanc_config() -> dict:
    """docker/orthanc.json for the Debian Orthanc here: its DICOMweb plugin by path (the image
    enables it by environment), the users of orthanc.env.example, a short StableAge, the
    sprim modality on this host."""
    cfg = json.loads((DOCKER / "orthanc.json").read_text())
    users = json.loads(env_example("orthanc")["ORTHANC__REGISTERED_USERS"])
    cfg.update(Plugins=[DICOMWEB_PLUGIN], RegisteredUsers=users, StableAge=2,
               RemoteAccessAllowed=False)  # fmt: skip
    return cfg


@pytest.fixture
def host(tmp_path):
    if not rabbit_ready() or not orthanc_available():
        pytest.skip("RabbitMQ and Orthanc + DICOMweb needed (make services)")
    pg = make_pg_db()
    if pg is None:
        pytest.skip("PostgreSQL not running on 127.0.0.1:5432")
    vhost = make_vhost()
    orthanc = OrthancServer(tmp_path / "orthanc", config=orthanc_config())
    try:
        orthanc.start()
        yield Host(tmp_path, vhost, pg, orthanc)
    finally:
        orthanc.close()
        from workers.platform.jobstore import _STORES

        if pg in _STORES:
            _STORES.pop(pg).dispose()
        drop_pg_db(pg)
        drop_vhost(vhost)


def test_compose_services_as_host_processes_run_a_study(host, tmp_path, dcmtk):
    from workers.platform.jobstore import FINAL, JobStore

    services = compose_config(tmp_path / "compose")["services"]
    (tmp_path / "incoming").mkdir()
    procs: dict[str, Process] = {}
    envs = {}
    try:
        for name in ("worker", "api", "watch", "listen", "flower"):  # all SPRIM_SERVICES
            envs[name] = host.env(name, services[name].get("environment", {}))
            leftover = [v for v in envs[name].values()
                        if re.search(r"@(rabbitmq|postgres)\b|//orthanc:|/var/lib/sprim", v)]  # fmt: skip
            assert not leftover, f"{name}: not substituted: {leftover}"
            procs[name] = Process(
                name, host.command(name, services[name]["command"]), envs[name], tmp_path
            )
        assert set(procs) == set(SPRIM_SERVICES)
        api_url = f"http://127.0.0.1:{host.port('api', '8000')}"
        wait(lambda: b" ready." in procs["worker"].log.read_bytes(), 120, "worker", procs["worker"])
        wait(lambda: answers(api_url + "/health"), 60, "api", procs["api"])
        listen_port = host.port("listen", "11112")
        wait(lambda: subprocess.run(["echoscu", "-aec", "SPRIM", "127.0.0.1", str(listen_port)],
                                    capture_output=True).returncode == 0,
             60, "listen to answer C-ECHO", procs["listen"])  # fmt: skip
        metrics = {n: f"http://127.0.0.1:{host.port(n, '9808')}/metrics"
                   for n in ("worker", "watch", "listen")}  # fmt: skip
        for n, url in metrics.items():
            wait(lambda url=url: answers(url), 60, f"{n} metrics", procs[n])
        # watch is following the feed (first start from now) before the study arrives
        wait(lambda: b"watch_first_start" in procs["watch"].log.read_bytes(), 60, "watch",
             procs["watch"])  # fmt: skip

        # one real CT: storescu -> Orthanc; watch routes it when stable; the worker runs it
        slices = sorted(CT_SERIES.glob("*.dcm"))[:N_SLICES]
        study_uid = str(pydicom.dcmread(slices[0], stop_before_pixels=True).StudyInstanceUID)
        t_sent = time.time()
        host.orthanc.storescu(slices)
        store = JobStore(host.pg_url)

        def finished():
            jobs = [j for j in store.list(study_uid=study_uid) if j.state != "no_match"]
            return jobs if jobs and all(j.state in FINAL for j in jobs) else None

        jobs = wait(finished, 600, "the study's jobs to finish", *procs.values(), step=2)
        latency = time.time() - t_sent
        assert {j.rule for j in jobs} >= {"ct-volume-mpr"}
        assert all(j.state == "done" for j in jobs), [(j.rule, j.state, j.error) for j in jobs]

        # every output is in Orthanc (through DICOMweb, with sprim's credentials)
        for j in jobs:
            for out in j.outputs:
                hits = host.orthanc.session.post(
                    host.orthanc.url + "/tools/lookup", data=out["series_uid"], timeout=30
                ).json()
                [series] = [h for h in hits if h["Type"] == "Series"]
                stored = host.orthanc.get(f"/series/{series['ID']}").json()["Instances"]
                assert len(stored) == len(out["instances"]), out["series_description"]
        n_outputs = sum(len(j.outputs) for j in jobs)
        assert n_outputs >= 3  # at least the axial, coronal and sagittal reformats

        # metrics: the worker did the jobs, the API sees them in the store, ingest answers
        worker = samples(requests.get(metrics["worker"], timeout=10).text)
        mpr = next(j for j in jobs if j.rule == "ct-volume-mpr")
        lab = {"rule": "ct-volume-mpr", "institution": mpr.institution}
        assert worker[("sprim_jobs_total", frozenset({"state": "done", **lab}.items()))] == 1
        key = ("sprim_stable_to_stored_seconds_sum", frozenset({"rule": "ct-volume-mpr"}.items()))
        stable_to_stored = worker[key]
        assert 0 < stable_to_stored < latency
        tokens = json.loads(envs["api"]["SPRIM_API_TOKENS"])
        admin = next(t for t, inst in tokens.items() if inst == "*")
        r = requests.get(api_url + "/metrics", headers={"Authorization": f"Bearer {admin}"},
                         timeout=10)  # fmt: skip
        assert r.status_code == 200, r.text
        api = samples(r.text)
        assert api[("sprim_jobs_in_state", frozenset({"state": "done", **lab}.items()))] == 1
        assert api[("sprim_job_store_up", frozenset())] == 1
        for n in ("watch", "listen"):
            text = requests.get(metrics[n], timeout=10).text
            assert "sprim_job_store_query_duration_seconds_count" in text, n
        # flower, as compose runs it (basic auth from sprim.env), lists the worker
        flower = f"http://127.0.0.1:{host.port('flower', '5555')}"
        auth = tuple(envs["flower"]["FLOWER_BASIC_AUTH"].split(":", 1))
        listed = wait(
            lambda: requests.get(flower + "/api/workers", params={"refresh": "1"}, auth=auth,
                                 timeout=30).json() if answers(flower + "/healthcheck") else None,
            60, "flower to list the worker", procs["flower"],
        )  # fmt: skip
        assert len(listed) == 1
        print(f"\nstudy of {N_SLICES} slices: sent -> all {len(jobs)} jobs done {latency:.1f} s; "
              f"stable -> stored (ct-volume-mpr) {stable_to_stored:.1f} s; {n_outputs} outputs")  # fmt: skip
    finally:
        for p in procs.values():
            p.stop()
