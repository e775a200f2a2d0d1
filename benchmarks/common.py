"""Shared pieces of the benchmark scripts: the machine header, running the public CLIs as timed
subprocesses (wall time, peak memory), a competing CPU-bound process, phantom datasets, and writing
each result table as JSON + Markdown under benchmarks/results/ (atomically).

Only public entry points are used (``python -m lnm_auto <command>``, documented output files), so the
scripts keep working when the package's internals change.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lnm_auto  # noqa: E402
from lnm_auto.utils.io import atomic_write_text, save_json  # noqa: E402
from lnm_auto.utils.threads import affinity_cores, available_cores, cgroup_cpu_limit, configure_threads  # noqa: E402

# The commands get the caller's environment, not the thread settings below.
_CALLER_ENV = dict(os.environ)
# Work timed inside the benchmark process (forward passes, reads) uses the commands' thread settings; this
# must happen before torch is imported (documentation/threads.md).
configure_threads()

RESULTS_DIR = Path(__file__).resolve().parent / "results"
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

# Runs a command and reports the peak RSS of its largest process (this wrapper's RUSAGE_CHILDREN covers
# the command and every descendant it reaped), so each measurement starts from a fresh maximum.
_RUSAGE_WRAPPER = (
    "import json, resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1], 'w').write(json.dumps({'rc': rc, 'maxrss_kb': ru.ru_maxrss, 'user_s': ru.ru_utime, "
    "'sys_s': ru.ru_stime}))\n"
    "sys.exit(rc)\n")

# One CPU-bound competitor: a single-threaded numpy matmul loop, like a second user's job.
_COMPETITOR = (   # dies with the benchmark that started it, even when that one is killed (argv[1]: its pid)
    "import os, sys, numpy as np\n"
    "from lnm_auto.utils.processes import die_with_parent\n"
    "die_with_parent(int(sys.argv[1]))\n"
    "a = np.random.rand(256, 256)\n"
    "while True:\n"
    "    a = (a @ a) / 256.0 + 0.5\n")


def machine_header() -> dict:
    """Cores, CPU, torch version, device and the load at the start: printed and stored with every table."""
    import torch
    cpu_model = ""
    with contextlib.suppress(OSError):
        cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name")), "")
    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host_cpu": cpu_model,
            "cores_available": available_cores(), "cores_affinity": affinity_cores(),
            "cgroup_cpu_quota": cgroup_cpu_limit(), "os_cpu_count": os.cpu_count(),
            "load_average_1min_at_start": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "device": device, "python": platform.python_version(), "lnm_auto": lnm_auto.__version__,
            "lnm_auto_commit": commit,
            "thread_env": {k: _CALLER_ENV[k] for k in ("LNM_NUM_THREADS", "OMP_WAIT_POLICY", *THREAD_ENV_VARS)
                           if k in _CALLER_ENV}}


def header_line(header: dict) -> str:
    """The machine header as one readable line."""
    return (f"{header['date']}: {header['cores_available']} core(s) available ({header['host_cpu'] or 'cpu'}), "
            f"torch {header['torch']}, device {header['device']}, load {header['load_average_1min_at_start']} at "
            f"start, lnm_auto {header['lnm_auto']} {header['lnm_auto_commit']}")


def format_value(v) -> str:
    """Numbers to 3 significant digits for tables; everything else as text."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table with the union of the rows' keys as columns."""
    if not rows:
        return "(no rows)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(format_value(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, header: dict, rows: list[dict], notes: list[str] | None = None,
                  results_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Print the table and write ``<name>.json`` and ``<name>.md`` (machine header, table, notes)."""
    notes = list(notes or [])
    md = (f"# {name}\n\n{header_line(header)}\n\n" + markdown_table(rows)
          + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else ""))
    print("\n" + md)
    json_path, md_path = results_dir / f"{name}.json", results_dir / f"{name}.md"
    save_json({"benchmark": name, "machine": header, "rows": rows, "notes": notes}, json_path)
    atomic_write_text(md_path, md)
    print(f"written: {json_path}, {md_path}")
    return json_path, md_path


def lnm_command(command: str, *args: str) -> list[str]:
    """A public lnm_auto CLI command run with this interpreter (``lnm_<command>`` on the PATH is the same)."""
    return [sys.executable, "-m", "lnm_auto", command, *map(str, args)]


def bench_env(workdir: Path, **extra: str | None) -> dict[str, str]:
    """The environment for CLI runs: data folders under ``workdir``, no progress bars, plus ``extra``
    (a value of None removes the variable)."""
    env = dict(_CALLER_ENV, LNM_raw=str(workdir / "raw"), LNM_preprocessed=str(workdir / "preprocessed"),
               LNM_results=str(workdir / "results"), LNM_NO_PROGRESS="1")
    for k, v in extra.items():
        env.pop(k, None) if v is None else env.__setitem__(k, str(v))
    return env


def thread_env(num_threads: int | None) -> dict[str, str | None]:
    """Environment entries that give a CLI run ``num_threads`` torch threads (None: its own default).
    Sets $LNM_NUM_THREADS and, for versions that read only OpenMP's variable, $OMP_NUM_THREADS."""
    if num_threads is None:
        return {"LNM_NUM_THREADS": None, "OMP_NUM_THREADS": None, "MKL_NUM_THREADS": None}
    return {"LNM_NUM_THREADS": str(num_threads), "OMP_NUM_THREADS": str(num_threads),
            "MKL_NUM_THREADS": str(num_threads)}


@dataclass
class RunResult:
    """One timed command: wall seconds, CPU seconds, peak RSS (largest process, and the whole process tree
    when psutil is installed), output."""
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    peak_tree_rss_mb: float | None
    stdout: str
    stderr: str = field(repr=False, default="")


def run_timed(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float | None = None) -> RunResult:
    """Run ``cmd``; raise with its last output lines if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        usage_file = Path(tmp) / "usage.json"
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _RUSAGE_WRAPPER, str(usage_file), *cmd], env=env, cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler = _TreeMemorySampler(proc.pid)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RuntimeError(f"{' '.join(cmd)}: no result within {timeout} s") from None
        finally:
            sampler.stop()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = "\n".join((out + err).strip().splitlines()[-15:])
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
        usage = json.loads(usage_file.read_text())
    return RunResult(wall, usage["user_s"] + usage["sys_s"], usage["maxrss_kb"] / 1024, sampler.peak_mb, out, err)


class _TreeMemorySampler:
    """Peak of the summed RSS of a process and its descendants, sampled every 0.2 s (needs psutil)."""

    def __init__(self, pid: int):
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        try:
            import psutil
        except ImportError:
            return
        self.peak_mb = 0.0
        self._thread = threading.Thread(target=self._run, args=(psutil, pid), daemon=True)
        self._thread.start()

    def _run(self, psutil, pid: int) -> None:
        try:
            root = psutil.Process(pid)
        except psutil.Error:
            return
        while not self._stop.wait(0.2):
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
            except psutil.Error:
                return
            self.peak_mb = max(self.peak_mb or 0.0, total / 2**20)

    def stop(self) -> None:
        self._stop.set()


@contextlib.contextmanager
def competing_process(active: bool = True) -> Iterator[subprocess.Popen | None]:
    """While inside, one other CPU-bound process (single-threaded numpy matmul loop) runs; stopped on exit."""
    if not active:
        yield None
        return
    env = dict(_CALLER_ENV, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _COMPETITOR, str(os.getpid())], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(1.0)   # numpy imported, loop spinning
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_phantom(workdir: Path, dataset_id: int, cases: int, test_cases: int = 0, extra_args: tuple = (),
                 env: dict | None = None) -> RunResult | None:
    """Write a CT phantom with lnm_make_phantom unless the same one (id, case counts, args) is already there."""
    stamp = workdir / "raw" / f".phantom_{dataset_id}.json"
    wanted = {"cases": cases, "test_cases": test_cases, "args": list(map(str, extra_args))}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return None
    result = run_timed(lnm_command("make_phantom", "-d", dataset_id, "--cases", cases, "--test-cases", test_cases,
                                   *extra_args), env=env or bench_env(workdir))
    save_json(wanted, stamp)
    return result


def dataset_dir(root: Path, dataset_id: int) -> Path:
    """The ``Dataset<id>_<Name>`` folder under ``root``."""
    found = sorted(root.glob(f"Dataset{dataset_id:03d}_*"))
    if not found:
        raise RuntimeError(f"no dataset {dataset_id:03d} under {root}")
    return found[0]


# "crops/s": every crop a step's forward passes see (a mean-teacher step: labelled, unlabelled in two views and
# pseudo-labelled); logs before it said "nodes/s" and counted only the plan's batch of labelled nodes per step
_EPOCH_LINE = re.compile(r"epoch (\d+)/\d+:.*?([\d.]+) s,(?: ([\d.]+) (?:crops|nodes)/s,)? waiting for data (\d+)%")
_START_LINE = re.compile(r"training .*?(\d+) training nodes.*?batch (\d+)")


def parse_training_log(text: str) -> dict:
    """Epoch times, data-wait fractions and training crops/s of the last run in an lnm_train training log
    (a log may hold several runs). Crops/s: the log's own figure when it prints one,
    else training nodes per epoch (whole batches) per epoch second, validation included."""
    starts = [m for m in _START_LINE.finditer(text)]
    last = text[starts[-1].start():] if starts else text
    epochs = [m.groups() for m in _EPOCH_LINE.finditer(last)]
    out = {"epoch_s": [float(e[1]) for e in epochs], "data_wait": [int(e[3]) / 100 for e in epochs],
           "crops_per_s": [float(e[2]) for e in epochs if e[2] is not None], "crops_per_s_source": "log"}
    if len(out["crops_per_s"]) != len(epochs) and starts:
        n, batch = int(starts[-1].group(1)), int(starts[-1].group(2))
        out["crops_per_s"] = [math.ceil(n / batch) * batch / t for t in out["epoch_s"]]
        out["crops_per_s_source"] = "nodes per epoch / epoch time (incl. validation)"
    if not epochs:
        raise RuntimeError("no epoch line in the training log: has its format changed? (benchmarks/common.py)")
    return out


def newest_training_log(fold_folder: Path) -> Path:
    """The fold's newest training log (training_log.txt, or training_log_<date>.txt, one per run)."""
    logs = sorted(Path(fold_folder).glob("training_log*.txt"), key=lambda p: p.stat().st_mtime)
    if not logs:
        raise RuntimeError(f"no training_log*.txt in {fold_folder}")
    return logs[-1]


def fold_folder_of(train_stdout: str, results_root: Path) -> Path:
    """The fold folder a finished lnm_train wrote: its 'results in <folder>' line, else the folder of the
    newest training log under ``results_root`` (the trainer name changes with --epochs)."""
    for line in reversed(train_stdout.splitlines()):
        if line.startswith("results in "):
            return Path(line.removeprefix("results in ").strip())
    logs = sorted(results_root.glob("Dataset*/*/fold_*/training_log*.txt"), key=lambda p: p.stat().st_mtime)
    if not logs:
        raise RuntimeError(f"no training log under {results_root}")
    return logs[-1].parent


def train(workdir: Path, dataset_id: int, configuration: str, epochs: int, env: dict, fold: int | str = 0,
          extra_args: tuple = ()) -> tuple[RunResult, Path, dict]:
    """One lnm_train run: its timing, its fold folder and its parsed training log. A model folder left in the
    workdir by a run under other plans (an older lnm_auto) is removed first: benchmarks always train afresh."""
    cmd = lnm_command("train", dataset_id, configuration, fold, "--epochs", epochs, *extra_args)
    try:
        r = run_timed(cmd, env=env)
    except RuntimeError as e:
        stale = re.search(r"error: (\S+)/plans\.json: the plans changed", str(e))
        if not stale:
            raise
        shutil.rmtree(stale.group(1))
        r = run_timed(cmd, env=env)
    folder = fold_folder_of(r.stdout, workdir / "results")
    return r, folder, parse_training_log(newest_training_log(folder).read_text())


def prediction_input(raw_dataset: Path, n_cases: int, out: Path) -> list[str]:
    """A flat lnm_predict input folder (``<case>_0000.nii.gz`` + ``<case>_nodes.nii.gz``, symlinks) holding
    the first ``n_cases`` test cases of a raw dataset; returns their ids."""
    images = sorted((raw_dataset / "imagesTs").glob("*_0000.nii.gz"))[:n_cases]
    if len(images) < n_cases:
        raise RuntimeError(f"{raw_dataset} has only {len(images)} test cases, {n_cases} wanted")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    ids = []
    for image in images:
        case = image.name.removesuffix("_0000.nii.gz")
        (out / image.name).symlink_to(image.resolve())
        (out / f"{case}_nodes.nii.gz").symlink_to((raw_dataset / "nodesTs" / f"{case}.nii.gz").resolve())
        ids.append(case)
    return ids


def predict(input_dir: Path, output_dir: Path, model_folder: Path, env: dict, extra_args: tuple = ()) -> tuple[RunResult, float]:
    """One lnm_predict run; returns its timing and the prediction time it reports in predict_info.json
    (interpreter start excluded; the wall time when the file has none). ``output_dir`` is emptied first:
    lnm_predict skips cases already predicted there."""
    shutil.rmtree(output_dir, ignore_errors=True)
    r = run_timed(lnm_command("predict", "-i", input_dir, "-o", output_dir, "-m", model_folder, "--quiet",
                              "--no_probmaps", *extra_args), env=env)
    info = json.loads((output_dir / "predict_info.json").read_text())
    return r, float(info.get("wall_time_s", r.wall_s))
