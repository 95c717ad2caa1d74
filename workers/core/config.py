"""Configuration by environment (``SPRIM_*``), each with a documented default.

With nothing set, sprim runs embedded: a folder as archive, SQLite as job store, no broker.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from pydantic import Field, PrivateAttr, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPRIM_", env_file=None, extra="ignore")

    home: Path = Field(Path("./.sprim"), description="Working folder for the embedded defaults.")
    broker_url: str | None = Field(
        None,
        description="Celery broker, e.g. amqp://guest:guest@127.0.0.1:5672//. Unset: in-process.",
    )
    archive_url: str | None = Field(
        None,
        description="DICOMweb root of the archive, e.g. http://127.0.0.1:8042/dicom-web. Unset: folder archive.",
    )
    job_store_url: str | None = Field(
        None, description="SQLAlchemy URL of the job store. Unset: SQLite in SPRIM_HOME/jobs.db."
    )
    rules_file: Path | None = Field(None, description="Routing rules YAML. Unset: built-in rules.")
    uid_prefix: str = Field(
        "1.2.826.0.1.3680043.8.498.",
        description="Root for derived UIDs (pydicom's registered prefix by default; use your org root).",
    )
    institution_name: str = Field("", description="InstitutionName written into provenance.")
    station_name: str = Field("SPRIM", description="StationName of derived objects.")
    # -- job platform (issue 4) --
    queue_prefix: str = Field(
        "sprim", description="Prefix of the Celery queues (<prefix>.cpu, <prefix>.io)."
    )
    dispatch_window: int = Field(
        2,
        description="Jobs handed to the broker at once: set to the total worker slots (fairness bound).",
    )
    max_attempts: int = Field(
        8,
        description="Attempts of a job on transient archive errors / lost workers "
        "(8 with 2 s doubling backoff: about 4 min of archive outage survived).",
    )
    retry_backoff_s: float = Field(
        2.0, description="First retry delay; doubles per attempt (max 300 s)."
    )
    step_time_limit_s: float = Field(
        600.0, description="Soft time limit per step of a job (hard: soft x 1.1 + 30 s)."
    )
    io_time_limit_s: float = Field(300.0, description="Time allowance per job for fetch + store.")
    release_interval_s: float = Field(
        5.0, description="Workers also release waiting jobs this often."
    )
    metrics_port: int = Field(
        0,
        ge=0,
        description="Port of the Prometheus endpoint of `sprim worker` (all its pool processes, "
        "through PROMETHEUS_MULTIPROC_DIR, which must then name a folder of its own), "
        "`sprim watch` and `sprim listen`. 0: none (`sprim serve` has /metrics).",
    )
    plugins: str = Field("", description="Comma-separated modules imported at start (extra steps).")
    api_tokens: str = Field(
        "",
        description='API tokens -> institution, JSON {"token": "institution"}; "*" = all institutions.',
    )
    console_secret: str = Field(
        "",
        description="Key signing web console session cookies. Unset: a random key per "
        "`sprim serve` process (sessions end when it restarts).",
    )
    # -- failure semantics (issue 11): leases, store outages, poison jobs --
    lease_s: float = Field(
        60.0,
        gt=1,
        description="Lease of a running job, renewed by its worker every quarter of it; a job "
        "whose lease expired (worker lost, completion not recorded) is requeued.",
    )
    store_retry_s: float = Field(
        60.0,
        ge=0,
        description="How long a worker retries an unreachable job store (backoff) before it "
        "hands the job back to the broker.",
    )
    max_worker_losses: int = Field(
        3,
        ge=1,
        description="A job whose worker died (killed, out of memory) this many times fails "
        "as a poison job.",
    )
    job_memory_mb: int = Field(
        0,
        ge=0,
        description="Address-space limit (MB) of each job process (RLIMIT_AS of Celery pool "
        "processes); a job over it fails with its own reason. 0: no limit.",
    )
    worker_recycle_mb: int = Field(
        1024,
        ge=0,
        description="A Celery pool process whose resident memory is above this (MB) after a "
        "job is replaced by a fresh one (worker_max_memory_per_child): memory a large job "
        "left in the allocator, VTK and the preview renderer is not carried into the next "
        "job. 0: never.",
    )
    # -- archive loop (issue 5) --
    archives: dict[str, str] = Field(
        {},
        description='Named archives, JSON {"name": "spec"}; spec: http(s)://… DICOMweb root, '
        "dicom://AET@host:port (C-STORE), or a folder. Rules' destination names one.",
    )
    destinations: dict[str, str] = Field(
        {},
        description='Output archive per source archive name or institution, JSON {"key": "name or spec"}, '
        "used when the rule names none. Default: the archive the study came from.",
    )
    ae_title: str = Field("SPRIM", description="sprim's AE title (listener, C-STORE SCU).")
    listen_host: str = Field("0.0.0.0", description="Address `sprim listen` binds.")
    listen_port: int = Field(11112, description="DICOM port of `sprim listen`.")
    listen_allowed_aets: str = Field(
        "", description="Comma-separated calling AE titles `sprim listen` accepts; empty: any."
    )
    listen_quiet_period_s: float = Field(
        30.0,
        description="A study received by `sprim listen` is complete after this many quiet seconds.",
    )
    listen_store: Path | None = Field(
        None, description="Store of `sprim listen`. Unset: SPRIM_HOME/incoming."
    )
    watch_url: str | None = Field(
        None,
        description="Orthanc REST root `sprim watch` follows. Unset: SPRIM_ARCHIVE_URL without /dicom-web.",
    )
    watch_interval_s: float = Field(
        1.0, description="Seconds between change-feed polls of `sprim watch`."
    )
    listen_tls_cert: Path | None = Field(
        None,
        description="PEM certificate of `sprim listen` for DICOM TLS (with SPRIM_LISTEN_TLS_KEY). "
        "Unset: plain DICOM.",
    )
    listen_tls_key: Path | None = Field(
        None, description="PEM private key of SPRIM_LISTEN_TLS_CERT."
    )
    listen_tls_ca: Path | None = Field(
        None,
        description="PEM CA(s) of the client certificates `sprim listen` requires (mutual TLS). "
        "Unset: no client certificate asked.",
    )
    secrets_dir: Path | None = Field(
        None,
        description="Folder of secret files (Docker/Kubernetes secrets): a file named like a "
        "variable in lower case (e.g. sprim_archive_pacs_password) gives its value.",
    )
    # -- input gate (issue 9) --
    max_volume_mb: int = Field(
        2048,
        gt=0,
        description="Largest volume or step output buffer (MB) sprim allocates for one series; "
        "larger series are refused before their pixels are read.",
    )
    # -- zip inputs (issue 9): an archive over a limit is refused whole --
    zip_max_mb: int = Field(
        4096, gt=0, description="Largest total uncompressed size (MB) of a zip input."
    )
    zip_max_ratio: int = Field(
        200,
        gt=1,
        description="Largest compression ratio of a zip member over 1 MB (zip bombs expand ~1000x).",
    )
    zip_max_members: int = Field(100_000, gt=0, description="Most members in one zip input.")
    zip_max_depth: int = Field(
        1, ge=0, description="Zips inside zips opened: 1 = one level, 0 = none (deeper: skipped)."
    )
    # -- one read per series, storing while computing (issue 13) --
    series_cache_mb: int = Field(
        2048,
        ge=0,
        description="Fetched source series kept per host in SPRIM_HOME/cache/series, shared by "
        "the jobs of the rules that match one series (least recently used evicted). 0: off.",
    )
    series_cache_s: float = Field(
        600.0,
        gt=0,
        description="Seconds a cached series is used after its fetch (then fetched again: an "
        "archive may overwrite instances in place).",
    )
    series_memo_s: float = Field(
        60.0,
        ge=0,
        description="Seconds a worker process keeps the last series it read, for the next job "
        "of the same series content (freed then, or when another series comes). 0: off.",
    )
    store_parallel: int = Field(
        2,
        ge=1,
        le=16,
        description="Outputs of one job stored at once while its next steps compute.",
    )

    @property
    def work_dir(self) -> Path:
        return self.home / "work"


def _secrets_dir() -> str | None:
    return os.environ.get("SPRIM_SECRETS_DIR") or None


@lru_cache
def settings() -> Settings:
    """Process-wide settings, read once from the environment (and ``SPRIM_SECRETS_DIR``)."""
    return Settings(_secrets_dir=_secrets_dir())


# -- archive credentials and TLS (issue 12) -----------------------------------------------------
class ConfigError(ValueError):
    """A setting is missing, inconsistent or unreadable; the message names the variable."""


class ArchiveAccess(BaseSettings):
    """How sprim authenticates to one archive and checks its certificate.

    Variables ``SPRIM_ARCHIVE_<NAME>_<FIELD>`` for an archive named in ``SPRIM_ARCHIVES``
    (``NAME`` upper-cased, other characters than letters and digits as ``_``), and
    ``SPRIM_ARCHIVE_<FIELD>`` for ``SPRIM_ARCHIVE_URL``. A secret may also come from the file
    ``<VARIABLE>_FILE`` names, or from ``SPRIM_SECRETS_DIR``. Secrets are :class:`SecretStr`:
    they print as ``**********`` and are only read to build the request's header.
    """

    model_config = SettingsConfigDict(env_prefix="SPRIM_ARCHIVE_", env_file=None, extra="ignore")

    username: str | None = Field(None, description="HTTP basic user name.")
    password: SecretStr | None = Field(None, description="HTTP basic password.")
    password_file: Path | None = Field(None, description="File holding the password.")
    token: SecretStr | None = Field(
        None, description="Bearer token (Authorization: Bearer), instead of user and password."
    )
    token_file: Path | None = Field(None, description="File holding the token.")
    ca_bundle: Path | None = Field(
        None,
        description="PEM CA(s) that signed the archive's certificate (HTTPS, DICOM TLS). "
        "Unset: the system's CAs.",
    )
    tls_verify: bool = Field(
        True,
        description="Check the archive's certificate and host name. false: unchecked "
        "(warned at every start; tests only).",
    )
    client_cert: Path | None = Field(
        None, description="PEM client certificate for mutual TLS (with CLIENT_KEY)."
    )
    client_key: Path | None = Field(None, description="PEM private key of CLIENT_CERT.")
    _prefix: str = PrivateAttr("SPRIM_ARCHIVE_")

    @property
    def variables(self) -> str:
        """How the variables of this archive start, e.g. ``SPRIM_ARCHIVE_PACS_``."""
        return self._prefix

    @property
    def has_credentials(self) -> bool:
        return bool(self.username or self.token)

    def secret(self, name: str) -> str:
        """``password`` or ``token`` now: its file is read again at every call (a rotated
        secret needs no restart); the value read at start if the file cannot be read."""
        path = getattr(self, f"{name}_file")
        if path is not None:
            try:
                return Path(path).read_text().rstrip("\r\n")
            except OSError:
                pass
        value = getattr(self, name)
        return value.get_secret_value() if value is not None else ""

    def summary(self) -> dict[str, str]:
        """What is set, secrets as ``<set>``: for ``sprim config`` and logs."""
        out = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None or name.endswith("_file"):
                continue
            if name == "tls_verify" and value:
                continue
            out[name] = "<set>" if isinstance(value, SecretStr) else str(value)
        return out


def archive_variables(name: str | None) -> str:
    """The variable prefix of an archive's access settings (None: ``SPRIM_ARCHIVE_URL``'s)."""
    if not name:
        return "SPRIM_ARCHIVE_"
    return f"SPRIM_ARCHIVE_{re.sub(r'[^A-Za-z0-9]', '_', name).upper()}_"


def archive_access(name: str | None = None) -> ArchiveAccess:
    """Credentials and TLS settings of an archive, read now (secret files re-read each call).

    Raises
    ------
    ConfigError
        A secret file cannot be read, a password without user name, both a password and a
        token, or a certificate file that does not exist; the message names the variable,
        never a secret.
    """
    prefix = archive_variables(name)
    acc = ArchiveAccess(_env_prefix=prefix, _secrets_dir=_secrets_dir())
    acc._prefix = prefix
    for secret in ("password", "token"):
        path = getattr(acc, f"{secret}_file")
        if path is None:
            continue
        try:
            value = Path(path).read_text().rstrip("\r\n")
        except OSError as e:
            raise ConfigError(
                f"{prefix}{secret.upper()}_FILE: cannot read {path} ({e.strerror})"
            ) from None
        setattr(acc, secret, SecretStr(value))
    if acc.password is not None and not acc.username:
        raise ConfigError(f"{prefix}PASSWORD is set but {prefix}USERNAME is not")
    if acc.token is not None and acc.username:
        raise ConfigError(f"{prefix}TOKEN and {prefix}USERNAME are both set: use one")
    for field in ("ca_bundle", "client_cert", "client_key"):
        path = getattr(acc, field)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{prefix}{field.upper()}: no such file {path}")
    if acc.client_key is not None and acc.client_cert is None:
        raise ConfigError(f"{prefix}CLIENT_KEY is set but {prefix}CLIENT_CERT is not")
    return acc
