"""infra/k8s: every manifest loads, runs a real ``meterline`` subcommand with real flags (asked of
the installed ``meterline <cmd> --help``), names only real settings, and keeps the capacity rules
it states (worker and sink replicas within the partition count)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from meterline.core.config import Settings
from tests.roles.conftest import METERLINE, REPO

K8S = REPO / "infra" / "k8s"
SETTINGS_ENV = {f"METERLINE_{name.upper()}" for name in Settings.model_fields}


def _docs() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        out.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return out


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind = doc["kind"]
    if kind in ("Deployment", "Job", "StatefulSet"):
        return dict(doc["spec"]["template"]["spec"])
    if kind == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return None


def _containers() -> Iterator[tuple[Path, dict[str, Any], dict[str, Any]]]:
    for path, doc in _docs():
        spec = _pod_spec(doc)
        for container in (spec or {}).get("containers", []):
            yield path, doc, container


@cache
def _help(subcommand: tuple[str, ...]) -> str:
    proc = subprocess.run([METERLINE, *subcommand, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, f"`meterline {' '.join(subcommand)}` is not a command:\n{proc.stderr}"
    return proc.stdout


def test_manifests_load_and_name_the_roles() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _path, doc in _docs()}
    assert {
        ("ConfigMap", "meterline-config"),
        ("Secret", "meterline-secrets"),
        ("Deployment", "meterline-worker"),
        ("Deployment", "meterline-sink"),
        ("Deployment", "meterline-api"),
        ("Job", "meterline-migrate"),
        ("CronJob", "meterline-stripe-sync"),
    } <= kinds
    commands = {tuple(c["command"]) for _p, _d, c in _containers()}
    assert {("meterline", "worker"), ("meterline", "sink"), ("meterline", "api"), ("meterline", "migrate")} <= commands


def test_every_command_is_a_real_subcommand_with_real_flags() -> None:
    seen = 0
    for path, doc, container in _containers():
        argv = [*container["command"], *container.get("args", [])]
        assert argv[0] == "meterline", (path.name, argv)
        words = argv[1:]
        sub = []
        while words and not words[0].startswith("-"):
            sub.append(words.pop(0))
        assert sub, (path.name, argv)
        text = _help(tuple(sub))
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
        for word in words:
            if word.startswith("--"):
                assert word.split("=", 1)[0] in flags, f"{path.name} {doc['metadata']['name']}: {word} not in {flags}"
        seen += 1
    assert seen >= 5


def test_every_meterline_variable_is_a_setting() -> None:
    """Every METERLINE_* name in the manifests, comments included, is a Settings field, and every
    container takes the shared ConfigMap and Secret."""
    names: set[str] = set()
    for path in K8S.iterdir():
        names |= set(re.findall(r"\bMETERLINE_[A-Z0-9_]+", path.read_text()))
    assert names, "no settings named"
    assert names <= SETTINGS_ENV, sorted(names - SETTINGS_ENV)
    for path, doc in _docs():
        if doc["kind"] in ("ConfigMap", "Secret"):
            data = doc.get("data") or doc.get("stringData") or {}
            meterline = [k for k in data if k.startswith("METERLINE_")]
            assert set(meterline) <= SETTINGS_ENV, (path.name, meterline)
    for path, doc, container in _containers():
        refs = {next(iter(r.values()))["name"] for r in container.get("envFrom", [])}
        assert {"meterline-config", "meterline-secrets"} <= refs, (path.name, doc["metadata"]["name"])
        for env in container.get("env", []):
            assert not env["name"].startswith("METERLINE_") or env["name"] in SETTINGS_ENV, env


def test_settings_in_the_configmap_validate_and_replicas_fit_the_partitions(monkeypatch: pytest.MonkeyPatch) -> None:
    config = next(
        doc for _p, doc in _docs() if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "meterline-config"
    )
    secrets = next(
        doc for _p, doc in _docs() if doc["kind"] == "Secret" and doc["metadata"]["name"] == "meterline-secrets"
    )
    for key in list(os.environ):
        if key.startswith("METERLINE_"):
            monkeypatch.delenv(key)
    for key, value in {**config["data"], **secrets["stringData"]}.items():
        monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert settings.kafka_bootstrap and settings.clickhouse_dsn and settings.broker_flavor == "kafka"
    assert settings.clickhouse_dsn.startswith("http")  # a server: chDB admits one process per path
    for _p, doc in _docs():
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] in ("meterline-worker", "meterline-sink"):
            # A consumer group gives each partition to one member: more replicas would idle.
            assert doc["spec"]["replicas"] <= settings.partitions, doc["metadata"]["name"]
    api = next(c for _p, d, c in _containers() if d["metadata"]["name"] == "meterline-api")
    assert api["args"][api["args"].index("--port") + 1] == str(settings.api_port)
