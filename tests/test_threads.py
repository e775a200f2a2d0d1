"""Thread planning: core counts from affinity and cgroup quota files, torch settings, worker limits."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.threads import (CHILD_THREAD_ENV_VARS, ThreadPlan, affinity_cores, available_cores,
                                    cgroup_cpu_limit, configure_threads, plan_prediction, plan_threads, requested_threads,
                                    worker_init)


@pytest.fixture
def restore_threads():
    """configure_threads changes os.environ and torch's thread count: put both back afterwards."""
    saved_env, saved_threads = dict(os.environ), torch.get_num_threads()
    yield
    os.environ.clear()
    os.environ.update(saved_env)
    torch.set_num_threads(saved_threads)


# ---- plan_threads ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cores, workers, expected", [
    (1, None, ThreadPlan(1, 1, 0, 1)),        # one core: augment in the main process
    (2, None, ThreadPlan(2, 1, 1, 1)),        # the 2-core machine: one worker, torch keeps both cores
    (4, None, ThreadPlan(4, 1, 1, 1)),
    (16, None, ThreadPlan(16, 1, 4, 1)),      # one worker per four cores
    (128, None, ThreadPlan(128, 1, 8, 1)),    # at most 8 automatic workers
    (2, 0, ThreadPlan(2, 1, 0, 1)),           # an explicit count is kept
    (8, 5, ThreadPlan(8, 1, 5, 1)),
])
def test_plan_threads_on_hand_made_core_counts(cores, workers, expected):
    assert plan_threads(cores, workers) == expected


@pytest.mark.parametrize("cores, workers, threads, expected", [
    (1, None, None, (0, 1)),      # one core: cases prepared in the main process
    (2, None, None, (1, 1)),      # the 2-core machine: one worker prepares, torch scores on the other core
    (16, None, None, (1, 15)),
    (2, 0, None, (0, 2)),         # -npp 0: torch keeps every core
    (2, 3, None, (3, 1)),         # more workers than cores: torch still gets one thread
    (8, None, 4, (1, 4)),         # -nt wins
])
def test_plan_prediction_on_hand_made_core_counts(cores, workers, threads, expected):
    assert plan_prediction(cores, workers, threads) == expected


def test_plan_threads_rejects_impossible_counts():
    with pytest.raises(ValueError, match="n_cores"):
        plan_threads(0)
    with pytest.raises(ValueError, match="n_workers"):
        plan_threads(2, -1)
    with pytest.raises(ValueError, match="n_workers"):
        plan_prediction(2, -1)


# ---- cgroup quota and affinity ---------------------------------------------------------------------
def _fake_cgroup(tmp_path, proc_line: str, files: dict[str, str]):
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_line + "\n")
    return root, proc


def test_cgroup_v2_quota_is_read_in_cores_and_rounded_down(tmp_path):
    root, proc = _fake_cgroup(tmp_path, "0::/", {"cpu.max": "150000 100000"})
    assert cgroup_cpu_limit(root, proc) == pytest.approx(1.5)
    assert available_cores(root, proc) == 1


def test_cgroup_v2_without_quota_leaves_the_affinity_count(tmp_path):
    root, proc = _fake_cgroup(tmp_path, "0::/", {"cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None
    assert available_cores(root, proc) == affinity_cores()


def test_cgroup_v2_tightest_limit_along_the_hierarchy_wins(tmp_path):
    root, proc = _fake_cgroup(tmp_path, "0::/user.slice/job", {
        "user.slice/job/cpu.max": "max 100000", "user.slice/cpu.max": "100000 50000", "cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root, proc) == pytest.approx(2.0)
    assert available_cores(root, proc) == min(2, affinity_cores())


def test_cgroup_v1_quota_under_a_combined_controller_folder(tmp_path):
    root, proc = _fake_cgroup(tmp_path, "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root, proc) == pytest.approx(3.0)


def test_cgroup_v1_minus_one_means_no_quota(tmp_path):
    root, proc = _fake_cgroup(tmp_path, "1:cpu:/", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root, proc) is None


def test_quota_below_one_core_still_gives_one_thread(tmp_path):
    root, proc = _fake_cgroup(tmp_path, "0::/", {"cpu.max": "20000 100000"})
    assert cgroup_cpu_limit(root, proc) == pytest.approx(0.2)
    assert available_cores(root, proc) == 1


def test_available_cores_follows_the_affinity_mask():
    saved = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(saved)})
        assert affinity_cores() == 1
        assert available_cores() == 1
    finally:
        os.sched_setaffinity(0, saved)
    assert affinity_cores() == len(saved)


def test_available_cores_agrees_with_an_independent_implementation():
    """joblib's loky reads the same affinity and cgroup files (rounding a fractional quota up)."""
    loky = pytest.importorskip("joblib.externals.loky")
    quota = cgroup_cpu_limit()
    if quota is not None and quota != int(quota):
        pytest.skip(f"fractional cgroup quota {quota}: the two round differently")
    assert available_cores() == loky.cpu_count()


# ---- requested thread counts ------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5", "2 threads"])
def test_bad_env_var_is_one_clear_line(monkeypatch, value):
    monkeypatch.setenv("LNM_NUM_THREADS", value)
    with pytest.raises(LNMError) as err:
        requested_threads()
    message = str(err.value)
    assert "\n" not in message and "$LNM_NUM_THREADS" in message and repr(value).strip("'") in message


def test_requested_threads_precedence(monkeypatch):
    monkeypatch.delenv("LNM_NUM_THREADS", raising=False)
    assert requested_threads() is None
    monkeypatch.setenv("LNM_NUM_THREADS", " 3 ")
    assert requested_threads() == 3
    assert requested_threads(5) == 5          # the -nt flag beats the environment
    monkeypatch.setenv("LNM_NUM_THREADS", "")
    assert requested_threads() is None
    with pytest.raises(LNMError, match="-nt"):
        requested_threads(0)


def test_bad_env_var_through_a_cli_is_one_line_and_exit_1(monkeypatch, capsys):
    from lnm_auto.cli import evaluate_entry
    monkeypatch.setenv("LNM_NUM_THREADS", "abc")
    assert evaluate_entry(["-ref", "r.csv", "-pred", "p.csv", "-o", "out"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lnm_evaluate: error: $LNM_NUM_THREADS")


# ---- configure_threads / worker_init -------------------------------------------------------------------
def test_configure_threads_sets_torch_threads_and_child_environment(monkeypatch, restore_threads):
    monkeypatch.delenv("LNM_NUM_THREADS", raising=False)
    assert configure_threads(1) == 1 and torch.get_num_threads() == 1
    assert configure_threads(2) == 2 and torch.get_num_threads() == 2   # a second call is harmless
    assert all(os.environ[v] == "1" for v in CHILD_THREAD_ENV_VARS)
    monkeypatch.setenv("LNM_NUM_THREADS", "1")
    assert configure_threads() == 1 and torch.get_num_threads() == 1
    monkeypatch.delenv("LNM_NUM_THREADS")
    assert configure_threads() == available_cores() == torch.get_num_threads()


def test_simpleitk_gets_one_thread_unless_the_user_set_another(monkeypatch, restore_threads):
    import SimpleITK as sitk
    saved = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        monkeypatch.delenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", raising=False)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
        configure_threads(1)
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
        assert os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "1"   # for processes started later
        monkeypatch.setenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")
        configure_threads(1)
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 2
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(saved)


def test_user_wait_policy_is_kept(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    configure_threads(1)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


_CHILD = """
import json, subprocess, sys, torch
from lnm_auto.utils.threads import configure_threads
configure_threads(2)
configure_threads(2)
grandchild = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                            capture_output=True, text=True, check=True).stdout
import os
print(json.dumps({"intra": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                  "wait_policy": os.environ.get("OMP_WAIT_POLICY"), "grandchild": int(grandchild)}))
"""


@pytest.mark.slow   # a fresh interpreter (and its child) importing torch
def test_fresh_process_gets_its_threads_and_its_children_one(restore_threads):
    env = {k: v for k, v in os.environ.items() if k not in (*CHILD_THREAD_ENV_VARS, "OMP_WAIT_POLICY", "LNM_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"intra": 2, "interop": 1, "wait_policy": "PASSIVE", "grandchild": 1}


def _worker_threads(_):
    from threadpoolctl import threadpool_info
    import SimpleITK as sitk
    return (torch.get_num_threads(), sorted({p["num_threads"] for p in threadpool_info()}),
            sitk.ProcessObject.GetGlobalDefaultNumberOfThreads())


def test_forked_worker_gets_one_thread_while_the_parent_keeps_its_own(restore_threads):
    import SimpleITK  # noqa: F401  loaded in the parent, as in preprocessing: the worker inherits its pool
    torch.set_num_threads(2)
    with multiprocessing.get_context("fork").Pool(1, initializer=worker_init) as pool:
        torch_threads, pool_threads, itk_threads = pool.map(_worker_threads, [0])[0]
    assert torch_threads == 1 and pool_threads == [1] and itk_threads == 1
    assert torch.get_num_threads() == 2
