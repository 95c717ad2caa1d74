"""Fixtures of the platform tests: a private RabbitMQ vhost, a job store, worker processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.platform_kit import (
    ROOT,
    VENV_BIN,
    drop_pg_db,
    drop_vhost,
    make_pg_db,
    make_vhost,
    rabbit_ready,
)

RULES = """
rules:
  - name: touch-normal
    match: {Modality: {in: [CT]}, SeriesDescription: {regex: "^AXIAL"}}
    select_series:
      where: {ImageType: {contains_all: [ORIGINAL, PRIMARY]}}
      prefer: thinnest
    run:
      - {use: test.touch, with: {sleep_s: 0.1, label: "TOUCH"}}
    priority: normal
  - name: touch-urgent
    match: {Modality: {in: [CT]}, SeriesDescription: {regex: "^URGENT"}}
    run:
      - {use: test.touch, with: {sleep_s: 0.1, label: "TOUCH URGENT"}}
    priority: urgent
  - name: touch-quiet
    trigger: {on: study_stable, quiet_period: 1s}
    match: {SeriesDescription: {regex: "^QUIET"}}
    select_series: {prefer: thinnest}
    run:
      - {use: test.touch, with: {label: "QUIET"}}
  - name: touch-slow
    match: {SeriesDescription: {eq: SLOW}}
    run:
      - {use: test.touch, with: {sleep_s: 4, label: "SLOW"}}
  - name: touch-chaos
    match: {SeriesDescription: {eq: CHAOS}}
    run:
      - {use: test.touch, with: {sleep_s: 1.5, label: "CHAOS"}}
"""


class Platform:
    """Environment shared by the test process and its worker processes."""

    def __init__(self, tmp: Path, vhost: str, store_url: str, broker_port: int = 5672) -> None:
        self.tmp, self.vhost = tmp, vhost
        self.archive = tmp / "archive"
        self.rules = tmp / "rules.yaml"
        self.rules.write_text(RULES)
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "SPRIM_HOME": str(tmp / "home"),
            "SPRIM_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{broker_port}/{vhost}",
            "SPRIM_JOB_STORE_URL": store_url,
            "SPRIM_RULES_FILE": str(self.rules),
            "SPRIM_PLUGINS": "tests.platform_kit",
            "SPRIM_DISPATCH_WINDOW": "2",
            "SPRIM_RETRY_BACKOFF_S": "0.2",
            "SPRIM_RELEASE_INTERVAL_S": "2",
        }
        self.workers: list[subprocess.Popen] = []

    def start_worker(self, name: str, concurrency: int = 2) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115
        p = subprocess.Popen(
            [str(VENV_BIN / "celery"), "-A", "tasks", "worker", "-l", "info", "-c", str(concurrency),
             "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.workers.append(p)
        deadline = time.monotonic() + 60
        logf = self.tmp / f"{name}.log"
        while b"ready." not in logf.read_bytes():
            assert p.poll() is None, logf.read_text()[-3000:]
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.1)
        return p

    def kill(self, p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)

    def stop_all(self) -> None:
        for p in self.workers:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(timeout=20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    self.kill(p)


@contextlib.contextmanager
def open_platform(plat: Platform):
    """The test process joins ``plat``: its SPRIM_* settings, the Celery dispatcher; undone after."""
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in plat.env.items() if k.startswith("SPRIM_")})
    from workers.core.config import settings

    settings.cache_clear()
    from tasks.app import app as celery_app
    from tasks.celery_dispatcher import CeleryDispatcher
    from workers.platform import dispatcher, inprocess, submission

    celery_app.conf.broker_url = plat.env["SPRIM_BROKER_URL"]  # if tasks was imported before
    celery_app._pool = None  # connections of an earlier platform's broker: not reused
    if "amqp" in celery_app.__dict__:
        celery_app.amqp._producer_pool = None
    dispatcher.set_dispatcher(CeleryDispatcher())
    try:
        yield plat
    finally:
        plat.stop_all()
        os.environ.clear()
        os.environ.update(saved)
        settings.cache_clear()
        dispatcher.set_dispatcher(inprocess.InProcessDispatcher())
        from workers.platform.jobstore import _STORES

        for s in list(_STORES.values()):
            s.dispose()
        _STORES.clear()
        submission._ARCHIVES.clear()


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    if not rabbit_ready():
        pytest.skip("RabbitMQ not running on 127.0.0.1:5672 (make services)")
    tmp = tmp_path_factory.mktemp("platform")
    vhost = make_vhost()
    pg = make_pg_db()
    url = pg or f"sqlite:///{tmp / 'jobs.db'}"
    try:
        with open_platform(Platform(tmp, vhost, url)) as plat:
            yield plat
    finally:
        if pg:
            drop_pg_db(pg)
        drop_vhost(vhost)
