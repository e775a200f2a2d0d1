"""Thread counts chosen from the cores this process may actually use (documentation/threads.md).

Why: torch's OpenMP team works in lock step, and by default (GNU libgomp) a thread that finished its
share busy-waits for the others. When the cores are shared (a second CPU-bound job, our own data workers,
a cgroup quota), the spinning thread burns the core the late thread needs: training ran 10-40x slower
beside one other job instead of 2x. So OpenMP waits passively, the main process gets one torch thread
per core it may really use, worker processes get one thread each, and inter-op parallelism is off.

Where each setting has to happen:
- ``configure_threads`` at the start of every CLI command, before torch is imported: OMP_WAIT_POLICY=PASSIVE
  (read once, when torch loads OpenMP), torch intra-op threads for the main process (a runtime call), and
  OMP/MKL/OpenBLAS = 1 in ``os.environ`` for processes started later.
- ``worker_init`` as the initializer of every worker process (data augmentation, preprocessing and
  prediction pools): forked workers inherit the parent's torch thread count, not the environment.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lnm_auto.utils.errors import LNMError

ENV_NUM_THREADS = "LNM_NUM_THREADS"
# read by OpenMP, MKL, OpenBLAS and numexpr when a library loads in a new process
CHILD_THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
ITK_THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"   # read by ITK when SimpleITK first starts a filter
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
MAX_AUTO_DATA_WORKERS = 8


@dataclass(frozen=True)
class ThreadPlan:
    """How many threads and processes one lnm_auto command uses."""
    intra_op_threads: int       # torch threads of the main process (convolutions, matmuls)
    inter_op_threads: int       # torch's pool for running independent ops concurrently: 1 (our graphs are chains)
    data_workers: int           # background processes producing batches / preprocessing cases
    threads_per_worker: int     # torch / BLAS / OpenMP / SimpleITK threads inside each worker


def plan_threads(n_cores: int, n_workers: int | None = None) -> ThreadPlan:
    """Threads for ``n_cores`` available cores and ``n_workers`` data worker processes (None: our default,
    one worker per four cores, at least one from two cores on, at most 8).

    The main process keeps every core for torch: workers spend most of their time blocked on a full batch
    queue, and one torch thread per core is what avoids lock-step stalls. Workers get one thread each so
    that ``n_workers`` of them never multiply into ``n_workers x n_cores`` threads."""
    if n_cores < 1:
        raise ValueError(f"n_cores must be >= 1, got {n_cores}")
    if n_workers is None:
        n_workers = 0 if n_cores == 1 else min(MAX_AUTO_DATA_WORKERS, max(1, n_cores // 4))
    if n_workers < 0:
        raise ValueError(f"n_workers must be >= 0, got {n_workers}")
    return ThreadPlan(intra_op_threads=n_cores, inter_op_threads=1, data_workers=n_workers, threads_per_worker=1)


def plan_prediction(n_cores: int, n_workers: int | None = None, num_threads: int | None = None) -> tuple[int, int]:
    """(preprocessing worker processes, torch threads of the main process) for predicting on the CPU.

    Default: one background worker cuts the next case's crops while the networks score this one (none on a
    single core), and torch gets the cores the workers leave, at least one. Node batches are small (one
    case's nodes), so each operation's OpenMP team spends much of its time waking up: with passive waiting,
    two torch threads scored a case 1.8x slower than one on two cores (lnm_predict, 5 folds x 4 flips)."""
    if n_cores < 1:
        raise ValueError(f"n_cores must be >= 1, got {n_cores}")
    workers = (1 if n_cores >= 2 else 0) if n_workers is None else n_workers
    if workers < 0:
        raise ValueError(f"n_workers must be >= 0, got {workers}")
    return workers, num_threads or max(1, n_cores - workers)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_dirs(cgroup_root: Path, proc_self_cgroup: Path, controller: str | None) -> list[Path]:
    """The existing cgroup folders that can limit this process, innermost first: its own cgroup and
    every ancestor up to the mount root. ``controller`` None: the unified (v2) hierarchy, whose line
    in /proc/self/cgroup is '0::/path'; else a v1 controller such as 'cpu' ('4:cpu,cpuacct:/path')."""
    mount, rel = (cgroup_root, "/") if controller is None else (cgroup_root / controller, "/")
    for line in (_read_text(proc_self_cgroup) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controller is None and hierarchy == "0" and controllers == "":
            rel = path
        elif controller is not None and controller in controllers.split(","):
            mount, rel = cgroup_root / controllers, path
    own = PurePosixPath("/", rel)
    candidates = [mount / str(p).lstrip("/") for p in (own, *own.parents)]
    # inside a container the mount root is usually the process's own cgroup and the listed path is absent
    return [d for d in dict.fromkeys(candidates) if d.is_dir()]


def cgroup_cpu_limit(cgroup_root: Path | None = None, proc_self_cgroup: Path | None = None) -> float | None:
    """The CPU quota of this process's cgroup in cores (cgroup v2 cpu.max or v1 cpu.cfs_quota_us /
    cpu.cfs_period_us; the tightest along the hierarchy), or None when there is no quota."""
    root = CGROUP_ROOT if cgroup_root is None else Path(cgroup_root)
    proc = PROC_SELF_CGROUP if proc_self_cgroup is None else Path(proc_self_cgroup)
    limits = []
    for d in _own_cgroup_dirs(root, proc, None):
        text = _read_text(d / "cpu.max")          # v2: "<quota> <period>" or "max <period>"
        if text:
            quota, _, period = text.partition(" ")
            if quota != "max" and _positive_number(quota) and _positive_number(period):
                limits.append(int(quota) / int(period))
    for d in _own_cgroup_dirs(root, proc, "cpu"):
        quota, period = _read_text(d / "cpu.cfs_quota_us"), _read_text(d / "cpu.cfs_period_us")   # v1: -1 = none
        if quota and period and _positive_number(quota) and _positive_number(period):
            limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def _positive_number(text: str) -> bool:
    return text.isdigit() and int(text) > 0


def affinity_cores() -> int:
    """Cores this process may be scheduled on (CPU affinity mask; os.cpu_count() where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # macOS / Windows have no affinity call
        return os.cpu_count() or 1


def available_cores(cgroup_root: Path | None = None, proc_self_cgroup: Path | None = None) -> int:
    """Cores this process can really use: the smaller of its affinity mask and its cgroup CPU quota
    (a fractional quota is rounded down), at least 1."""
    cores = affinity_cores()
    quota = cgroup_cpu_limit(cgroup_root, proc_self_cgroup)
    if quota is not None:
        cores = min(cores, math.floor(quota))
    return max(1, cores)


def requested_threads(num_threads: int | None = None) -> int | None:
    """The thread count asked for: ``num_threads`` (the -nt flag) if given, else $LNM_NUM_THREADS, else None."""
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise LNMError(f"-nt/--num_threads must be a whole number >= 1, got {num_threads!r}")
        return num_threads
    env = os.environ.get(ENV_NUM_THREADS)
    if env is None or env.strip() == "":
        return None
    if not env.strip().isdigit() or int(env) < 1:
        raise LNMError(f"${ENV_NUM_THREADS} must be a whole number of threads >= 1, got '{env}'; "
                       f"unset it to use all available cores")
    return int(env)


def configure_threads(num_threads: int | None = None, uses_torch: bool = True) -> int:
    """Set torch's thread counts for this process, OpenMP's passive waiting, and one thread per library for
    processes started later. Returns the intra-op thread count. Call at the start of a command, before
    torch is imported (else the wait policy cannot change); calling again is harmless. ``uses_torch=False``
    (commands that never run a network, e.g. preprocessing) leaves torch unimported: importing it costs
    seconds at every start; should it be imported later anyway, it runs single-threaded."""
    n = requested_threads(num_threads) or plan_threads(available_cores()).intra_op_threads
    for var in CHILD_THREAD_ENV_VARS:
        os.environ[var] = "1"
    # OpenMP reads its wait policy once, when torch loads it. Passive: a thread that finished its share
    # sleeps instead of spinning on a core another process needs (busy-waiting made training 10-40x slower
    # beside one competing job). A user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # SimpleITK: one thread. Its filters run here on node-sized regions (crops, node boxes), where starting ITK's
    # thread pool costs more than it saves (lnm_plan_and_preprocess -np 1 on 512 x 512 x 80 CT: 8.3 s with one
    # thread, 9.1-10.8 s with two); reading a file is single-threaded decompression either way. A user's own
    # setting wins.
    os.environ.setdefault(ITK_THREADS_ENV, "1")
    if "SimpleITK" in sys.modules and os.environ[ITK_THREADS_ENV].strip().isdigit():
        sys.modules["SimpleITK"].ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(os.environ[ITK_THREADS_ENV])))
    if not uses_torch and "torch" not in sys.modules:
        return n
    import torch
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _set_interop_threads(torch, 1)
    return n


def _set_interop_threads(torch, n: int) -> None:
    """torch allows setting the inter-op pool only before it first runs inter-op work; later calls (a second
    command in the same process) keep whatever is set."""
    if torch.get_num_interop_threads() == n:
        return
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass


def worker_init() -> None:
    """Initializer for worker processes (augmentation, preprocessing, prediction pools): one thread for
    torch, BLAS/OpenMP (threadpoolctl) and SimpleITK, so N workers use N cores, not N x cores."""
    for var in CHILD_THREAD_ENV_VARS:
        os.environ[var] = "1"
    if "torch" in sys.modules:   # forked from a parent that imported torch: its thread count came along
        torch = sys.modules["torch"]
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass
    else:
        threadpool_limits(limits=1)   # OpenBLAS / MKL / OpenMP pools already loaded in this process
    if "SimpleITK" in sys.modules:
        sys.modules["SimpleITK"].ProcessObject.SetGlobalDefaultNumberOfThreads(1)
