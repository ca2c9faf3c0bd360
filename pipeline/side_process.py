"""A process beside the inference threads for the writes that hold the GIL.

zarr's writes are mostly Python and so is feeding a GeoPackage (as was rasterio's ``rasterize``,
which labels.zarr used before ``pipeline.rasterise``), so in a thread beside the model they slow
it 2-4×; from a process of their own by a few percent (``benchmarks/gil_contention.py``). ``call`` runs a
function in this process's side process: one, started on first use, reused until ``shutdown``.
A daemonic process (a Dask worker with ``distributed.worker.daemon`` true, Dask's default) may
not start one: ``call`` then runs the function in the calling thread, with the same result.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

T = TypeVar("T")

_pool: ProcessPoolExecutor | None = None
_lock = threading.Lock()


PARENT_CHECK_SECONDS = 0.5


def _end_with_parent() -> None:
    """In the side process: exit once the process that started it is gone (it is then adopted by
    another), so a worker killed outright leaves no orphan behind. Not ``PR_SET_PDEATHSIG``: that
    fires when the *thread* that started the child ends, and a Dask worker thread, or an
    in-process cluster's, may end long before its process."""
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the run's client, which ends the run and this process

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="seamline-parent-watch", daemon=True).start()


def can_start() -> bool:
    """Whether this process may start a side process (daemonic processes may not have children)."""
    return not multiprocessing.current_process().daemon


def _side_pool() -> ProcessPoolExecutor | None:
    global _pool
    if not can_start():
        return None
    with _lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_end_with_parent)
        return _pool


def pid() -> int | None:
    """The side process's pid; None when it is not running."""
    pool = _pool
    processes = list((pool._processes or {}).values()) if pool is not None else []
    return next((p.pid for p in processes if p.is_alive()), None)


def call(function: Callable[..., T], *args) -> T:
    """``function(*args)`` in the side process when this process may have one, else here.
    ``function`` and ``args`` must pickle; exceptions come back as raised. If the side process
    died, the next call starts a new one."""
    global _pool
    pool = _side_pool()
    if pool is None:
        return function(*args)
    try:
        return pool.submit(function, *args).result()
    except BrokenProcessPool as err:
        with _lock:
            if _pool is pool:
                _pool = None
        pool.shutdown(wait=False)
        raise RuntimeError(f"the side process died while running {function.__qualname__}: {err}") from err


def shutdown() -> None:
    """End this process's side process, if it has one (a later ``call`` starts a new one)."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=False)
