"""Connect to a Dask cluster: a LocalCluster by default, any scheduler by address."""

from __future__ import annotations

from contextlib import contextmanager

from distributed import Client, LocalCluster


@contextmanager
def connect(scheduler: str | None = None, workers: int = 1, threads_per_worker: int = 2, dashboard: str = "127.0.0.1:8787"):
    """Yield a ``Client``; a local cluster (bound to 127.0.0.1) lives only inside the block."""
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    with LocalCluster(
        n_workers=workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address=dashboard,
    ) as cluster, Client(cluster) as client:
        yield client


def has_gpu_workers(client: Client) -> bool:
    """Whether any worker advertises a ``GPU`` resource (then segment tasks require one)."""
    return any(w.get("resources", {}).get("GPU") for w in client.scheduler_info()["workers"].values())
