"""The local stack the system benchmarks run on: one Tansu broker, one embedded chDB engine.

Everything binds 127.0.0.1 and lives in a temporary directory removed at the end. chDB allows one
engine path per process, so every benchmark gets its own DATABASE in the one engine, and its own
topic prefix on the one broker. :class:`PipelineRun` wires a pipeline the way
``tests/e2e/conftest.py`` does: faust worker processes + the ClickHouse sink on a thread here.
:class:`RuntimeRun` starts the whole production stack instead (:class:`meterline.shell.runtime.Runtime`:
workers with the pricing AND credit agents, both sinks, the HTTP API with the credits routes) on
the shared broker and a fresh database; load generators run as separate processes
(:func:`run_loadgen`, ``bench/_loadgen.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from meterline.core.config import Settings
from meterline.core.errors import DeliveryFailed
from meterline.core.pricing import load_price_book
from meterline.stack.broker import TansuBroker
from meterline.stack.clickhouse import apply_migrations, connect, default_migrations_dir
from meterline.stack.kafka import make_producer
from meterline.stack.topics import ensure_topics
from pipeline.assembly import Assembly
from pipeline.publish import publish_records
from pipeline.sink import ClickHouseSink
from pipeline.workers import WorkerProcess

PARTITIONS = 4


class Stack:
    """Broker + chDB engine for one bench process (context manager)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="meterline-bench-"))
        self.broker = TansuBroker(log_dir=self.root / "tansu")
        self.chdb_dsn = f"chdb://{(self.root / 'chdb' / 'engine').resolve()}"

    def __enter__(self) -> Stack:
        self.broker.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.broker.stop()
        if os.environ.get("METERLINE_BENCH_KEEP"):  # worker logs etc. for a look afterwards
            print(f"[bench] kept {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    def database(self, prefix: str) -> tuple[str, Any]:
        """A fresh migrated database: (name, client)."""
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        client = connect(self.chdb_dsn, database=name)
        apply_migrations(client, default_migrations_dir())
        return name, client

    def client(self, database: str) -> Any:
        return connect(self.chdb_dsn, database=database, create_database=False)

    def settings(self, prefix: str) -> Settings:
        ensure_topics(self.bootstrap, prefix, PARTITIONS)
        return Settings(
            kafka_bootstrap=self.bootstrap,
            topic_prefix=prefix,
            partitions=PARTITIONS,
            broker_flavor="tansu",
            data_dir=self.root / prefix.rstrip("."),
        )


def new_prefix(tag: str) -> str:
    return f"b{tag}{uuid.uuid4().hex[:6]}."


def produce_raw(bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes, int]]) -> tuple[int, int]:
    """Produce pre-encoded ``(key, value, n_events)`` records (murmur2, idempotent, acks=all) and wait
    for every acknowledgement. Returns (records, events)."""
    failures: list[str] = []
    producer = make_producer(bootstrap, {"linger.ms": 5, "message.max.bytes": 1_000_000})

    def on_delivery(err: object, _msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    n_rec = n_ev = 0
    for key, value, n in records:
        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        n_rec += 1
        n_ev += n
    if producer.flush(60) or failures:
        raise DeliveryFailed(f"bench producer: {len(failures)} failed deliveries ({failures[:1]})", topic=topic)
    return n_rec, n_ev


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (or one of its threads) from /proc, in seconds."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a live process, KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PipelineRun:
    """Workers + sink over one topic prefix and one database; :meth:`close` stops everything."""

    def __init__(self, stack: Stack, tag: str, *, price_book: Any, sink_interval_ms: int = 500) -> None:
        self.stack = stack
        self.prefix = new_prefix(tag)
        self.settings = stack.settings(self.prefix)
        self.database, self.ch = stack.database(f"bench_{tag}")
        self.sink_client = stack.client(self.database)
        self.log_dir = stack.root / "logs" / self.prefix.rstrip(".")
        # The pipeline builder of `meterline up` (pipeline/assembly.py): workers + the usage sink.
        self.assembly = Assembly(self.settings, lambda: self.sink_client, log_dir=self.log_dir, join_timeout=30)
        self.workers: list[WorkerProcess] = self.assembly.workers
        self.sink_interval_ms = sink_interval_ms
        self.sink: ClickHouseSink | None = None
        publish_records(
            self.settings.kafka_bootstrap, self.settings.topic("prices"), load_price_book(price_book).to_records()
        )

    @property
    def usage_topic(self) -> str:
        return self.settings.topic("usage-events")

    def start(self, n_workers: int) -> None:
        self.sink = self.assembly.start_usage_sink(thread_name="bench-sink", max_interval_ms=self.sink_interval_ms)
        self.assembly.start_workers(n_workers)

    @property
    def sink_thread(self) -> threading.Thread | None:
        """The usage sink's thread (its CPU time is measured)."""
        piece = self.assembly.pieces.get("sink")
        return piece.thread if piece is not None else None

    def count(self, where: str = "") -> int:
        return int(self.ch.query(f"SELECT count() FROM usage_priced {where}").result_rows[0][0])

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float, every: float = 0.25) -> float:
        """Poll ``predicate`` until true; returns the monotonic time it became true."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return time.monotonic()
            for w in self.workers:
                if not w.alive():
                    raise RuntimeError(f"{w.name} exited:\n{w.log_tail()}")
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {w.name}\n{w.log_tail()}" for w in self.workers)
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
            time.sleep(every)

    def close(self) -> None:
        self.assembly.stop(worker_timeout=10)
        try:
            self.ch.database = "default"
            self.ch.command(f"DROP DATABASE IF EXISTS `{self.database}` SYNC")
        except Exception:
            pass
        for c in (self.ch, self.sink_client):
            try:
                c.close()
            except Exception:
                pass


class RuntimeRun:
    """:class:`meterline.shell.runtime.Runtime` (``meterline up`` minus the broker) on the stack's broker, a
    fresh topic prefix and a fresh database of the stack's chDB engine; the bench price book published.
    Context manager: stops the runtime and drops the database."""

    def __init__(self, stack: Stack, tag: str, *, price_book: Any, workers: int = 1) -> None:
        from meterline.shell.runtime import Runtime
        from meterline.stack.clickhouse import with_database

        self.stack = stack
        self.prefix = new_prefix(tag)
        self.database = f"bench_{tag}_{uuid.uuid4().hex[:8]}"
        settings = Settings(
            kafka_bootstrap=stack.bootstrap,
            topic_prefix=self.prefix,
            partitions=PARTITIONS,
            broker_flavor="tansu",
            data_dir=stack.root / self.prefix.rstrip("."),
            api_port=0,
            clickhouse_dsn=with_database(stack.chdb_dsn, self.database),
        )
        self.runtime = Runtime(settings, workers=workers)
        self.price_book = price_book

    def __enter__(self) -> RuntimeRun:
        self.runtime.start(on_step=lambda _s: None)
        publish_records(
            self.stack.bootstrap, self.settings.topic("prices"), load_price_book(self.price_book).to_records()
        )
        return self

    def __exit__(self, *_exc: object) -> None:
        self.runtime.stop()
        try:
            client = self.stack.client("default")
            client.command(f"DROP DATABASE IF EXISTS `{self.database}` SYNC")
            client.close()
        except Exception:
            pass

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def url(self) -> str:
        return str(self.runtime.api_server.url)

    @property
    def admin_key(self) -> str:
        return str(self.runtime.admin_key)

    def query(self, sql: str) -> list[Any]:
        with self.runtime.query_client() as ch:
            return list(ch.query(sql).result_rows)

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.runtime.workers if w.pid]


def run_loadgen(mode: str, spec: dict[str, Any], workdir: Path, *, timeout: float) -> subprocess.Popen[bytes]:
    """Start ``python -m bench._loadgen mode`` (see that module); :func:`loadgen_result` collects it."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{mode}-{uuid.uuid4().hex[:6]}"
    spec_path, out_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.out.json"
    spec_path.write_text(json.dumps(spec))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench._loadgen", mode, str(spec_path), str(out_path)],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / f"{tag}.log").open("wb"),
    )
    proc.out_path = out_path  # type: ignore[attr-defined]
    proc.timeout = timeout  # type: ignore[attr-defined]
    return proc


def loadgen_result(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    try:
        proc.wait(timeout=proc.timeout)  # type: ignore[attr-defined]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise TimeoutError(f"load generator {proc.args} did not finish in {proc.timeout} s") from None  # type: ignore[attr-defined]
    out: Path = proc.out_path  # type: ignore[attr-defined]
    if proc.returncode != 0 or not out.exists():
        log = out.with_name(out.name.replace(".out.json", ".log"))
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"load generator {proc.args} exited {proc.returncode}:\n{tail}")
    return dict(json.loads(out.read_text()))


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process per thread group: Python threads by name (numbers stripped),
    native threads (librdkafka, chDB) by their kernel name."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    out: dict[str, float] = {}
    pid = os.getpid()
    for entry in Path(f"/proc/{pid}/task").iterdir():
        tid = int(entry.name)
        name = names.get(tid)
        if name is None:
            try:
                name = "native:" + (entry / "comm").read_text().strip()
            except OSError:
                continue
        group = re.sub(r"[-_:]?\d+$", "", re.sub(r"\(.*\)", "", name)).strip() or name
        if group.startswith("AnyIO worker thread"):
            group = "API threadpool (anyio)"
        c = cpu_seconds(pid, tid)
        if c == c:  # not NaN
            out[group] = out.get(group, 0.0) + c
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float], top: int = 8) -> dict[str, float]:
    """Per-group CPU seconds spent between two :func:`thread_cpu` snapshots, largest first."""
    d = {k: round(v - before.get(k, 0.0), 2) for k, v in after.items()}
    return dict(sorted(((k, v) for k, v in d.items() if v >= 0.05), key=lambda kv: -kv[1])[:top])


def read_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> list[tuple[bytes | None, bytes | None, int]]:
    """Every record of ``topic`` as ``(key, value, timestamp_ms)`` (the producer's create time), read
    from the beginning of each partition to its end (EOF), in partition order."""
    from meterline.stack.kafka import read_topic as read_all

    return [(m.key(), m.value(), m.timestamp()[1]) for m in read_all(bootstrap, topic, timeout=timeout)]
