"""Connect to a Dask cluster: a LocalCluster by default, any scheduler by address."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import warnings
from contextlib import contextmanager

import dask
from distributed import Client, LocalCluster, WorkerPlugin

from pipeline import side_process

LOCAL_WORKER_CONFIG = {
    # Dask's default MALLOC_TRIM_THRESHOLD_=65536 makes glibc hand back every large block torch frees
    # and fault it in again on the next tile: 0.45 vs 0.31 s per tile here (benchmarks/tile_speed.py)
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    # a daemonic worker may not start the side process that keeps labels.zarr and the GeoPackage
    # off the inference threads' GIL (pipeline/side_process.py)
    "distributed.worker.daemon": False,
}

# set for a local cluster unless the user's Dask config sets them (``unless_configured``)
LOCAL_WORKER_DEFAULTS = {
    # Dask's statistical profiler samples every busy thread's Python stack every 10 ms from the
    # worker's event loop, which then takes the GIL the inference threads need: ~10 % of a CPU run
    # (BENCHMARKS.md). DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=True fills the dashboard's Profile page again.
    "distributed.worker.profile.enabled": False,
}


def unless_configured(settings: dict) -> dict:
    """``settings`` less the keys the user's Dask config sets: in YAML files or ``DASK_*`` variables,
    or to other than Dask's default with ``dask.config.set``."""
    user = dask.config.collect()
    defaults = dask.config.merge(*dask.config.defaults)
    return {
        key: value for key, value in settings.items()
        if dask.config.get(key, None, config=user) is None
        and dask.config.get(key, None) == dask.config.get(key, None, config=defaults)
    }


def local_worker_config() -> dict:
    """The Dask config a local cluster's workers start with: ``LOCAL_WORKER_CONFIG`` always,
    ``LOCAL_WORKER_DEFAULTS`` unless the user's Dask config sets them."""
    return {**unless_configured(LOCAL_WORKER_DEFAULTS), **LOCAL_WORKER_CONFIG}


class ClusterError(ValueError):
    """A scheduler that cannot be reached, named with the reason."""


class SideProcessShutdown(WorkerPlugin):
    """Ends a worker's side process (``pipeline.side_process``) when the worker closes."""

    name = "seamline-side-process"

    def teardown(self, worker) -> None:
        side_process.shutdown()


class _InputErrorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            (message.startswith("Compute Failed") and ("SourceError(" in message or "Key:       load-model-" in message))
            or (message.startswith("Async instruction") and message.endswith("ended with CancelledError"))
        )


class InputErrorsOnce(WorkerPlugin):
    """Keeps workers from logging a traceback block per task for a bad input file (a corrupt or
    truncated image fails every tile read, and again on each retry), nor a line per task of that
    image that the run then drops (``workflows.run``): the run names the file once, in one line.
    Likewise a model that does not load (``workflows.run.model_load_error``)."""

    name = "seamline-input-errors-once"

    def setup(self, worker) -> None:
        for name in ("distributed.worker", "distributed.worker.state_machine"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _InputErrorFilter) for f in logger.filters):
                logger.addFilter(_InputErrorFilter())


class InterruptsToTheClient(WorkerPlugin):
    """A local cluster's worker processes share the terminal's process group, so Ctrl-C reaches
    them too and each printed a KeyboardInterrupt traceback: they ignore it, and the client, which
    gets it as well, stops the run and closes them."""

    name = "seamline-interrupts-to-the-client"

    def setup(self, worker) -> None:
        with contextlib.suppress(ValueError):  # not the process's main thread: nothing to change
            signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def connect(
    scheduler: str | None = None, workers: int = 1, threads_per_worker: int | None = None, dashboard: str = "127.0.0.1:8787"
):
    """Yield a ``Client``; a local cluster (bound to 127.0.0.1) lives only inside the block.

    Local workers get the machine's cores between them (``threads_per_worker`` None). Dask gives each
    worker process one torch thread; on the CPU each thread runs its own inference, one per core.
    Local workers are not daemonic, so each may start its side process for the writes
    (``pipeline.side_process``), and run without Dask's profiler unless the user's Dask config
    turns it on (``LOCAL_WORKER_DEFAULTS``); a nanny restarting a worker starts it with the same settings.
    """
    if scheduler:
        try:
            client = Client(scheduler)
        except (OSError, ValueError) as err:  # unreachable (OSError after Dask's connect timeout) or malformed
            raise ClusterError(f"Dask scheduler {scheduler}: cannot connect ({err})") from err
        with client:
            client.register_plugin(SideProcessShutdown())
            client.register_plugin(InputErrorsOnce())
            warn_if_daemonic(client)
            yield client
        return
    with dask.config.set(local_worker_config()):
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker or max(1, (os.cpu_count() or 1) // workers),
            processes=True,
            host="127.0.0.1",
            dashboard_address=dashboard,
        )
        with cluster, Client(cluster) as client:
            client.register_plugin(SideProcessShutdown())
            client.register_plugin(InputErrorsOnce())
            client.register_plugin(InterruptsToTheClient())
            yield client


def warn_if_daemonic(client: Client) -> None:
    """Warn when some workers are daemonic: they cannot start a side process, so their writes hold
    the GIL their inference threads need (slower, same results)."""
    daemonic = sorted(address for address, can in client.run(side_process.can_start, on_error="ignore").items() if not can)
    if daemonic:
        warnings.warn(
            f"{len(daemonic)} of {len(client.scheduler_info()['workers'])} Dask workers are daemonic ({', '.join(daemonic)}): "
            "they write labels.zarr and GeoPackages in the merge's thread, which slows their inference. Start workers "
            "with DASK_DISTRIBUTED__WORKER__DAEMON=False (distributed.worker.daemon: false) to give each a side process.",
            stacklevel=2,
        )


def has_gpu_workers(client: Client) -> bool:
    """Whether any worker advertises a ``GPU`` resource (then segment tasks require one)."""
    return any(w.get("resources", {}).get("GPU") for w in client.scheduler_info()["workers"].values())


def _device_type() -> str:
    from models.inference import default_device

    return default_device().type


def runs_on_gpu(client: Client) -> bool:
    """Whether segment tasks run on a GPU: some worker advertises one (they then require it), or
    every worker's model would load on CUDA (a local cluster on a GPU machine)."""
    if has_gpu_workers(client):
        return True
    devices = client.run(_device_type, on_error="ignore").values()
    return bool(devices) and all(device == "cuda" for device in devices)
