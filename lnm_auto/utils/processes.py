"""Worker processes that die with the process that started them.

A SIGKILL of ``lnm_plan_and_preprocess``, ``lnm_train`` or ``lnm_predict`` cannot run any clean-up, so
without help their worker processes (each holding hundreds of MB) keep running, orphaned, until they
notice their queue is gone. Every worker calls :func:`die_with_parent` first:

* Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` makes the kernel kill the worker the moment the thread that
  started it ends (every pool here is started from the main thread, so: when the main process ends);
* elsewhere (macOS, or where prctl is unavailable): a daemon thread polls ``os.getppid()`` once a second
  and ends the worker when it changes (the parent is gone and the worker was re-parented).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

from lnm_auto.utils.threads import worker_init

PR_SET_PDEATHSIG = 1   # <linux/prctl.h>
POLL_INTERVAL_S = 1.0


def die_with_parent(parent_pid: int | None = None) -> str:
    """Make this (worker) process end when its parent ends; returns how ('prctl' or 'poll').

    ``parent_pid``: the pid of the process that started this one, as that process saw itself; if it is
    already gone when the worker starts, the worker ends at once (the race prctl alone leaves open)."""
    parent_pid = os.getppid() if parent_pid is None else parent_pid
    how = "poll"
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                how = "prctl"
        except (OSError, AttributeError):
            pass
    if how == "poll":
        threading.Thread(target=_poll_parent, args=(parent_pid,), daemon=True, name="die_with_parent").start()
    if os.getppid() != parent_pid:   # the parent died before prctl took effect
        os._exit(1)
    return how


def _poll_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_INTERVAL_S)
    os._exit(1)


def worker_process_init(parent_pid: int | None = None) -> None:
    """Initializer of every worker process: end with the parent, and one thread per library (a worker running
    its own multi-threaded torch/BLAS/SimpleITK pools would oversubscribe the cores, documentation/threads.md)."""
    die_with_parent(parent_pid)
    worker_init()


def map_in_workers(fn, items: list, num_processes: int, desc: str, progress: bool = True) -> list:
    """``[fn(x) for x in items]``, in ``num_processes`` worker processes (this one when 1 or a single item),
    with a progress bar named ``desc``."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    from lnm_auto.utils.terminal import show_progress
    bar = dict(total=len(items), desc=desc, disable=not (progress and show_progress()))
    if num_processes > 1 and len(items) > 1:
        with ProcessPoolExecutor(num_processes, initializer=worker_process_init, initargs=(os.getpid(),)) as pool:
            return list(tqdm(pool.map(fn, items), **bar))
    return [fn(x) for x in tqdm(items, **bar)]
