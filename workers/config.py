"""Configuration by environment (``SPRIM_*``), each with a documented default.

With nothing set, sprim runs embedded: a folder as archive, SQLite as job store, no broker.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPRIM_", env_file=None, extra="ignore")

    home: Path = Field(Path("./.sprim"), description="Working folder for the embedded defaults.")
    broker_url: str | None = Field(
        None, description="Celery broker, e.g. amqp://guest:guest@127.0.0.1:5672//. Unset: in-process."
    )
    archive_url: str | None = Field(
        None, description="DICOMweb root of the archive, e.g. http://127.0.0.1:8042/dicom-web. Unset: folder archive."
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

    @property
    def work_dir(self) -> Path:
        return self.home / "work"


@lru_cache
def settings() -> Settings:
    """Process-wide settings, read once from the environment."""
    return Settings()
