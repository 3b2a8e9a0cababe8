"""The embedded Tansu broker: lifecycle, no orphans, and a real produce -> consume round trip."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from meterline.core.errors import BrokerUnavailable
from meterline.stack.broker import TansuBroker, wait_for_port

pytestmark = pytest.mark.broker


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0); treat it as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


def test_start_stop_leaves_no_process(tmp_path: Path) -> None:
    broker = TansuBroker(log_dir=tmp_path)
    with broker:
        pid = broker.pid
        assert pid is not None
        host, port = broker.bootstrap.split(":")
        assert host == "127.0.0.1"
        assert wait_for_port(host, int(port), 1.0)
        assert os.getpgid(pid) == pid  # its own process group
        assert broker.log_path is not None and broker.log_path.parent == tmp_path
    assert not broker.running
    assert _gone(pid)
    assert not wait_for_port(host, int(port), 0.2)
    with pytest.raises(BrokerUnavailable):
        _ = broker.bootstrap
    broker.stop()  # idempotent


def test_restart_after_stop(tmp_path: Path) -> None:
    broker = TansuBroker(log_dir=tmp_path)
    broker.start()
    first = broker.pid
    broker.start()  # no-op while running
    assert broker.pid == first
    broker.stop()
    broker.start()
    try:
        assert broker.running and broker.pid != first
    finally:
        broker.stop()


def test_broker_dies_with_its_parent(tmp_path: Path) -> None:
    """SIGKILL the parent process: PR_SET_PDEATHSIG must take the broker down too."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from meterline.stack.broker import TansuBroker
        b = TansuBroker(log_dir=Path({str(tmp_path)!r})).start()
        print(b.pid, flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        broker_pid = int(parent.stdout.readline())
        assert not _gone(broker_pid)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    assert _wait_gone(broker_pid), f"broker {broker_pid} outlived its SIGKILLed parent"


def test_failed_start_raises_with_log_tail(tmp_path: Path) -> None:
    fake = tmp_path / "fake-tansu"
    fake.write_text("#!/bin/sh\necho 'boom: cannot bind listener' >&2\nexit 3\n")
    fake.chmod(0o755)
    broker = TansuBroker(log_dir=tmp_path, binary=str(fake), startup_timeout=5)
    with pytest.raises(BrokerUnavailable) as info:
        broker.start()
    assert "boom: cannot bind listener" in str(info.value)
    assert "exited with code 3" in str(info.value)
    assert not broker.running


def test_produce_consume_round_trip(kafka_bootstrap: str, topics: dict[str, str]) -> None:
    topic = topics["usage-events"]
    producer = Producer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
        }
    )
    sent = {(f"cust-{i % 5}".encode(), f"event-{i}".encode()) for i in range(50)}
    delivered: list[tuple[bytes, int]] = []

    def on_delivery(err: object, msg: object) -> None:
        assert err is None, err
        delivered.append((msg.key(), msg.partition()))  # type: ignore[attr-defined]

    for key, value in sorted(sent):
        producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
    assert producer.flush(15) == 0
    assert len(delivered) == len(sent)
    partition_of: dict[bytes, set[int]] = {}
    for key, partition in delivered:
        partition_of.setdefault(key, set()).add(partition)
    assert all(len(p) == 1 for p in partition_of.values())  # a key always lands on one partition

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"g-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
        }
    )
    received: set[tuple[bytes, bytes]] = set()
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        while len(received) < len(sent) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            received.add((msg.key(), msg.value()))
            assert msg.partition() in partition_of[msg.key()]
    finally:
        consumer.close()
    assert received == sent
