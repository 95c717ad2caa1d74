"""Job store fixtures: the same tests on SQLite and on a throwaway PostgreSQL database."""

from __future__ import annotations

import os

import pytest

from tests.platform_kit import drop_pg_db, make_pg_db

RULES = """
rules:
  - name: touch
    trigger: {quiet_period: 0.3s}
    match: {Modality: {in: [CT]}}
    select_series:
      where: {ImageType: {contains_all: [ORIGINAL, PRIMARY]}}
      prefer: thinnest
    run:
      - {use: test.touch, with: {label: TOUCH}}
"""


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store_url(request, tmp_path_factory):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('store') / 'jobs.db'}"
        return
    url = make_pg_db()
    if url is None:
        pytest.skip("PostgreSQL not running on 127.0.0.1:5432")
    yield url
    from workers.platform.jobstore import _STORES

    if url in _STORES:
        _STORES.pop(url).dispose()
    drop_pg_db(url)


@pytest.fixture
def store(store_url):
    """A migrated, emptied store."""
    from workers.platform.jobstore import AuditRow, JobRow, JobStore, StudyRow

    s = JobStore(store_url)
    s.migrate()
    with s.Session.begin() as ses:
        for t in (AuditRow, JobRow, StudyRow):
            ses.query(t).delete()
    yield s
    s.dispose()


@pytest.fixture
def sprim_env(tmp_path, store_url, store, monkeypatch):
    """Embedded sprim on ``store_url`` with test rules, the test step and an in-process dispatcher."""
    from workers.core.config import settings
    from workers.platform import dispatcher, inprocess, submission

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    for k, v in {
        "SPRIM_HOME": str(tmp_path / "home"),
        "SPRIM_JOB_STORE_URL": store_url,
        "SPRIM_RULES_FILE": str(rules),
        "SPRIM_PLUGINS": "tests.platform_kit",
        "SPRIM_DISPATCH_WINDOW": "2",
        "SPRIM_API_TOKENS": '{"tok-a": "SITE A", "tok-b": "SITE B", "tok-admin": "*"}',
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SPRIM_BROKER_URL", raising=False)
    settings.cache_clear()
    disp = inprocess.InProcessDispatcher()
    dispatcher.set_dispatcher(disp)
    submission._ARCHIVES.clear()
    yield tmp_path
    disp.stop()  # no timer of this test may release jobs of the next one's store
    settings.cache_clear()
    assert os.environ.get("SPRIM_RULES_FILE") == str(rules)
