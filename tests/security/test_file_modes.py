"""Low (issue #20): other local users cannot read billing data. The real `meterline up` console
script (its own data dir and embedded chDB engine; the session's broker) leaves nothing in the data
directory readable by group or others, and admin.key is 0600 from its creation."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
METERLINE = str(Path(sys.executable).parent / "meterline")

pytestmark = pytest.mark.broker


def _wide(root: Path) -> list[str]:
    """Every path under ``root`` (root included) that group or others may access."""
    out = []
    for p in [root, *root.rglob("*")]:
        try:
            mode = p.lstat().st_mode
        except FileNotFoundError:  # a temporary file that went away meanwhile
            continue
        if not stat.S_ISLNK(mode) and mode & 0o077:
            out.append(f"{oct(mode & 0o777)} {p.relative_to(root)}")
    return out


def test_up_creates_its_data_private(kafka_bootstrap: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env.update(
        {
            "METERLINE_DATA_DIR": str(data),
            "METERLINE_API_PORT": "0",
            "METERLINE_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "METERLINE_BROKER_FLAVOR": "tansu",
            "METERLINE_TOPIC_PREFIX": f"modes{os.getpid()}.",
        }
    )
    log = (tmp_path / "up.log").open("w")
    # Started with the usual umask 022: the process itself must make its files private.
    up = subprocess.Popen(
        [METERLINE, "up"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=lambda: os.umask(0o022)
    )
    try:
        deadline = time.monotonic() + 120
        while not (data / "runtime.json").exists():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "meterline up did not come up:\n" + (tmp_path / "up.log").read_text()
            time.sleep(0.2)
        # `meterline stripe provision` forwarded into up creates stripe.sqlite there.
        provisioned = subprocess.run(
            [METERLINE, "stripe", "provision"], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
        )
        assert provisioned.returncode == 0, provisioned.stdout + provisioned.stderr
        for name in ("admin.key", "runtime.json", "api_keys.json", "stripe.sqlite", "chdb"):
            assert (data / name).exists(), name
        assert _wide(data) == []
        assert stat.S_IMODE((data / "admin.key").stat().st_mode) == 0o600
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(30)
        log.close()
