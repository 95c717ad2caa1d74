"""docker/ as the tests see it: the compose file resolved by ``docker-compose config`` (with the
example env files and secrets standing for the real ones), the image's environment."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
#: Services that run the sprim image (the others are upstream images).
SPRIM_SERVICES = ("api", "worker", "watch", "listen", "flower")


def compose_config(tmp: Path) -> dict:
    """``docker-compose config`` of a copy of docker/ whose env files and secrets are the
    committed examples (the real ones are git-ignored and hold passwords)."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose not installed (make sysdeps)")
    copy = tmp / "docker"
    shutil.copytree(DOCKER, copy, ignore=shutil.ignore_patterns("*.env", "prometheus-api-token"))
    for example in copy.rglob("*.example"):
        shutil.copyfile(example, example.with_suffix(""))
    r = subprocess.run(
        ["docker-compose", "-f", str(copy / "compose.yaml"), "config"],
        capture_output=True, text=True, timeout=120, cwd=copy,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def image_env() -> dict[str, str]:
    """The ``ENV`` of docker/Dockerfile (what every sprim container starts with)."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def env_example(name: str) -> dict[str, str]:
    """KEY=VALUE lines of docker/<name>.env.example."""
    out = {}
    for line in (DOCKER / f"{name}.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


def mounts(service: dict) -> dict[str, str]:
    """target -> source of a resolved service's volumes (short or long syntax)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = v.get("source", "")
        else:
            src, target = v.split(":")[:2]
            out[target] = src
    return out
