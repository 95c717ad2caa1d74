"""``sprim watch`` and ``sprim listen``: the two ways studies come in (added to ``workers.interfaces.cli``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:  # imported where used: `sprim --help` stays fast (issue 13)
    from workers.platform.dispatcher import Dispatcher

log = logging.getLogger(__name__)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Orthanc (civetweb) closes an idle keep-alive connection after 0.5 s: each 1 s poll
    # reconnects, which urllib3 logs at debug ("Resetting dropped connection"), as every request.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    for name in ("pylibjpeg", "openjpeg"):  # 32 plugin lines at start
        logging.getLogger(name).setLevel(logging.INFO)


#: How to make the broker dispatcher (``tasks.celery_dispatcher.CeleryDispatcher``), injected by the
#: composition root (``tasks.main``) when ``SPRIM_BROKER_URL`` is set; ``workers`` never imports it.
BROKER_DISPATCHER: Callable[[], Dispatcher] | None = None


def _dispatcher() -> Dispatcher:
    """The dispatcher jobs go to: the broker's when one is configured, else in-process.

    Embedded: jobs run in a background thread so the feed / the SCP is never blocked by a job.
    """
    from workers.core.config import settings
    from workers.platform.dispatcher import set_dispatcher
    from workers.platform.inprocess import InProcessDispatcher

    if settings().broker_url:
        if BROKER_DISPATCHER is not None:
            d = BROKER_DISPATCHER()
            set_dispatcher(d)
            return d
        log.warning("event=no_broker_dispatcher broker=set fallback=in-process")
    d = InProcessDispatcher(background=True)
    set_dispatcher(d)
    # what a previous embedded process left (it was killed): its running job and its queue
    d.start()
    return d


def _already_submitted(study_uid: str, key: str) -> bool:
    """Routing holds this hand-on: a job (or no-match record) carries its watch key. A study
    noted but not routed yet when the watcher died (or whose rules wait for their quiet period)
    is handed on again: routing never queues the same rule on the same series twice."""
    from workers.platform.jobstore import open_store

    jobs = open_store().list(study_uid=study_uid, limit=1000)
    return any((j.context or {}).get("watch_key") == key for j in jobs)


def watch_cmd(
    url: str | None = typer.Option(
        None,
        "--url",
        help="Orthanc REST root (default: SPRIM_WATCH_URL, or SPRIM_ARCHIVE_URL without /dicom-web).",
    ),
    interval: float | None = typer.Option(None, "--interval", help="Seconds between polls."),
    from_now: bool = typer.Option(
        True,
        "--from-now/--from-start",
        help="First start (no saved state): route only studies that become stable from now on "
        "(default), or replay the archive's whole change feed. Ignored once state exists.",
    ),
    once: bool = typer.Option(False, "--once", help="Read the feed until done, then exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Follow Orthanc's change feed; route each stable study (cursor persisted, resumes).

    A rule's quiet_period counts from the study's last instance: rules whose period is over
    when Orthanc reports the study stable are routed at once, the others when theirs ends.
    """
    import requests

    from workers.archives import ArchiveError, open_archive
    from workers.archives.access import http_session
    from workers.core.config import settings
    from workers.core.metrics import serve_metrics
    from workers.ingest.watch import Watcher, WatchError, state_path
    from workers.platform.jobstore import open_store
    from workers.platform.submission import notify_study

    _logging(verbose)
    serve_metrics()  # SPRIM_METRICS_PORT
    cfg = settings()
    if not (url or cfg.watch_url or cfg.archive_url):
        typer.echo("error: set --url, SPRIM_WATCH_URL or SPRIM_ARCHIVE_URL", err=True)
        raise typer.Exit(2)
    rest = (url or cfg.watch_url or cfg.archive_url or "").rstrip("/")
    rest = rest.removesuffix("/dicom-web")
    open_store()  # unreachable job store: one line at start-up (workers.interfaces.cli), not a late trace
    try:
        archive = open_archive(cfg.archive_url or f"{rest}/dicom-web")
        # Orthanc's REST API takes the DICOMweb archive's credentials and TLS settings
        access = getattr(archive, "access", None)
    except (ArchiveError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    disp = _dispatcher()

    def submit(study_uid: str, context: dict) -> None:
        quiet = float(context.pop("quiet_s", 0.0))
        notify_study(study_uid, archive, context, disp=disp, quiet_s=quiet, inline=True)

    watcher = Watcher(
        rest,
        state_path(cfg.home, rest),
        submit,
        already_submitted=_already_submitted,
        from_start=not from_now,
        session=http_session(access, archive.name) if access else None,
    )
    if once:
        try:
            watcher.poll_once()
        except (WatchError, requests.HTTPError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        return
    stop = threading.Event()
    _on_signals(stop)
    watcher.run(interval or cfg.watch_interval_s, stop)


def listen_cmd(
    port: int | None = typer.Option(None, "--port", help="DICOM port (default SPRIM_LISTEN_PORT)."),
    host: str | None = typer.Option(
        None, "--host", help="Bind address (default SPRIM_LISTEN_HOST)."
    ),
    aet: str | None = typer.Option(None, "--aet", help="Our AE title (default SPRIM_AE_TITLE)."),
    allow: list[str] = typer.Option(
        [],
        "--allow",
        help="Accepted calling AE title (repeatable; default SPRIM_LISTEN_ALLOWED_AETS).",
    ),
    quiet: float | None = typer.Option(None, "--quiet", help="Quiet period of a study, seconds."),
    store: Path | None = typer.Option(
        None, "--store", help="Store folder (default SPRIM_LISTEN_STORE)."
    ),
    no_fsync: bool = typer.Option(
        False, "--no-fsync", hidden=True, help="Benchmarks only: success before data is on disk."
    ),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", help="DICOM TLS: our PEM certificate (default SPRIM_LISTEN_TLS_CERT)."
    ),
    tls_key: Path | None = typer.Option(
        None, "--tls-key", help="DICOM TLS: its private key (default SPRIM_LISTEN_TLS_KEY)."
    ),
    tls_ca: Path | None = typer.Option(
        None,
        "--tls-ca",
        help="DICOM TLS: require client certificates signed by these CAs (SPRIM_LISTEN_TLS_CA).",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """C-STORE SCP: store instances durably, route each study after its quiet period."""
    from workers.archives.folder import FolderArchive
    from workers.core.config import settings
    from workers.core.metrics import serve_metrics
    from workers.ingest.listener import Listener, ListenerStore, StudyArrival, routable_series
    from workers.platform.jobstore import open_store
    from workers.platform.submission import submit_study

    _logging(verbose)
    serve_metrics()  # SPRIM_METRICS_PORT
    cfg = settings()
    root = store or cfg.listen_store or cfg.home / "incoming"
    our_aet = aet or cfg.ae_title
    allowed = allow or [a for a in cfg.listen_allowed_aets.split(",") if a.strip()]
    open_store()  # unreachable job store: one line at start-up (workers.interfaces.cli), not a late trace
    if not allowed:
        log.warning("event=listen_open_to_any_ae hint=set SPRIM_LISTEN_ALLOWED_AETS or --allow")
    cert = tls_cert or cfg.listen_tls_cert
    key = tls_key or cfg.listen_tls_key
    ca = tls_ca or cfg.listen_tls_ca
    ssl_context = None
    if cert or key or ca:
        from workers.core.tls import server_context

        if not cert:
            typer.echo("error: DICOM TLS needs a certificate (--tls-cert / SPRIM_LISTEN_TLS_CERT)",
                       err=True)  # fmt: skip
            raise typer.Exit(2)
        try:
            ssl_context = server_context(cert, key, ca)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            typer.echo(f"error: DICOM TLS certificate {cert} / key {key}: {e}", err=True)
            raise typer.Exit(2) from None
    archive = FolderArchive(root, name=f"listen:{our_aet}")
    disp = _dispatcher()

    def on_complete(a: StudyArrival) -> None:
        ctx = {"calling_ae": sorted(a.calling_aets)[0] if a.calling_aets else ""}
        series = routable_series(archive.series_of_study(a.study_uid))  # no SR/SEG/PR... inputs
        submit_study(a.study_uid, archive, ctx, disp=disp, series=series)

    ls = ListenerStore(
        root,
        quiet_period=quiet if quiet is not None else cfg.listen_quiet_period_s,
        on_complete=on_complete,
        fsync=not no_fsync,
    )
    Listener(
        ls,
        aet=our_aet,
        host=host or cfg.listen_host,
        port=port or cfg.listen_port,
        allowed_aets=allowed,
        ssl_context=ssl_context,
    ).serve_forever()


def _on_signals(stop: threading.Event) -> None:
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


def register(app: typer.Typer) -> None:
    """Add ``watch`` and ``listen`` to the ``sprim`` command line."""
    app.command("watch")(watch_cmd)
    app.command("listen")(listen_cmd)
