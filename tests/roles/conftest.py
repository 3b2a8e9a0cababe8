"""Running the roles as the operator does: the installed ``meterline`` console script, one process
per role, each with its own data dir (its own "host"), all on the session's Tansu broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
METERLINE = str(Path(sys.executable).parent / "meterline")


def role_env(kafka_bootstrap: str, prefix: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env.update(
        {
            "METERLINE_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "METERLINE_BROKER_FLAVOR": "tansu",
            "METERLINE_TOPIC_PREFIX": prefix,
            "METERLINE_PARTITIONS": "4",
            "METERLINE_DATA_DIR": str(data_dir),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def run(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([METERLINE, *args], env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(f"meterline {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


class Role:
    """One long-running ``meterline <role>`` process, its output in a log file."""

    def __init__(self, env: dict[str, str], args: list[str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        self.proc = subprocess.Popen(
            [METERLINE, *args], env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60, sig: int = signal.SIGTERM) -> int:
        """SIGTERM (what a supervisor such as Kubernetes sends) or SIGINT (Ctrl-C), and wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                pytest.fail(
                    f"meterline {' '.join(self.args)} did not stop on {signal.Signals(sig).name}:\n{self.log()}"
                )
        self._log.close()
        return int(self.proc.returncode)


@pytest.fixture
def roles() -> Iterator[Callable[[dict[str, str], list[str], Path], Role]]:
    started: list[Role] = []

    def start(env: dict[str, str], args: list[str], log_path: Path) -> Role:
        role = Role(env, args, log_path)
        started.append(role)
        return role

    yield start
    for role in started:
        if role.proc.poll() is None:
            role.proc.kill()
            role.proc.wait(10)
        role._log.close()


def wait_until(what: str, check: Callable[[], bool], timeout: float, *alive: Role) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for role in alive:
            assert role.alive(), f"meterline {' '.join(role.args)} exited:\n{role.log()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + "\n".join(
            r.log()[-3000:] for r in alive
        )
        time.sleep(0.5)


def worker_metrics(data_dir: Path, name: str) -> dict[str, float]:
    """The worker's /metrics (found through its advert in data_dir/metrics), as {sample: value}."""
    advert = data_dir / "metrics" / f"{name}.json"
    if not advert.exists():
        return {}
    url = json.loads(advert.read_text())["url"]
    try:
        text = httpx.get(url, timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            sample, _, value = line.rpartition(" ")
            out[sample] = float(value)
    return out
