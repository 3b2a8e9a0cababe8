"""Run one faust worker process: ``python -m pipeline.worker`` (settings from ``METERLINE_*``).

``meterline up`` starts one or more of these as child processes; operators on real Kafka run
them under their process supervisor. SIGTERM / Ctrl-C stop the worker cleanly (faust commits
what it acknowledged); SIGKILL is safe too: it only causes a replay (see pipeline/app.py).
"""

from __future__ import annotations

import logging
import os

import faust

from meterline.core.config import Settings
from meterline.stack.metrics import serve_worker_metrics, worker_metrics_port
from pipeline.app import create_app


def main() -> None:
    settings = Settings()
    app = create_app(settings)
    # /metrics of this worker, advertised in <data_dir>/metrics/<name>.json (docs/metrics.md).
    name = os.environ.get("METERLINE_WORKER_NAME") or f"worker-{os.getpid()}"
    serve_worker_metrics(
        settings.data_dir,
        name,
        worker_metrics_port(name, os.environ.get("METERLINE_WORKER_METRICS_PORT")),
        host=os.environ.get("METERLINE_WORKER_METRICS_HOST") or "127.0.0.1",
    )
    loglevel = os.environ.get("METERLINE_WORKER_LOGLEVEL", "WARNING")
    logging.getLogger("faust").setLevel(loglevel)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    profile_path = os.environ.get("METERLINE_WORKER_PROFILE")
    if not profile_path:
        worker.execute_from_commandline()
        return
    # Benchmarks: profile the whole worker; the stats are written when it stops (SIGTERM).
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        worker.execute_from_commandline()
    finally:
        profiler.disable()
        profiler.dump_stats(profile_path)


if __name__ == "__main__":
    main()
