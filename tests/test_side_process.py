"""The side process that keeps the writes off the inference threads' GIL."""

import multiprocessing
import os
import signal
import threading
import time

import psutil
import pytest

from pipeline import side_process


@pytest.fixture(autouse=True)
def fresh_side_process():
    side_process.shutdown()
    yield
    side_process.shutdown()


def gone(pid: int, within: float = 10.0) -> bool:
    """Whether ``pid`` ends (or is left a zombie for its new parent to reap) ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_calls_run_in_one_other_process_and_raise_there_as_here():
    assert side_process.pid() is None
    child = side_process.call(os.getpid)
    assert child != os.getpid() and side_process.call(os.getpid) == child == side_process.pid()
    with pytest.raises(ValueError, match="invalid literal"):
        side_process.call(int, "not a number")
    side_process.shutdown()
    assert side_process.pid() is None and gone(child)


def test_a_dead_side_process_is_reported_and_replaced():
    child = side_process.call(os.getpid)
    with pytest.raises(RuntimeError, match="side process died while running _exit"):
        side_process.call(os._exit, 3)
    assert gone(child)
    assert side_process.call(os.getpid) not in (child, os.getpid())


def report_call_pid(queue) -> None:
    queue.put((os.getpid(), side_process.call(os.getpid)))
    time.sleep(60)  # until killed


def test_a_daemonic_process_runs_calls_itself():
    """A daemonic process (a default Dask worker) may not start children: calls run in it."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=report_call_pid, args=(queue,), daemon=True)
    process.start()
    try:
        own, called = queue.get(timeout=60)
        assert own == called == process.pid
    finally:
        process.kill()


def test_the_side_process_outlives_the_thread_that_started_it():
    """Started from a worker thread that then ends (an in-process cluster closed, a thread pool
    shrinking), it must go on serving the process: it died with the thread, failing the next image."""
    started = []
    thread = threading.Thread(target=lambda: started.append(side_process.call(os.getpid)))
    thread.start()
    thread.join()
    time.sleep(3 * side_process.PARENT_CHECK_SECONDS)
    assert side_process.call(os.getpid) == started[0] == side_process.pid()


def test_the_side_process_ends_when_its_parent_is_killed():
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=report_call_pid, args=(queue,))
    process.start()
    own, child = queue.get(timeout=60)
    assert own == process.pid != child
    os.kill(process.pid, signal.SIGKILL)
    process.join(10)
    assert gone(child)
