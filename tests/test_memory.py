"""Freed large buffers are reused, not mapped (and page-faulted) afresh, once the data commands tune the allocator."""
from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
from lnm_auto.utils.memory import reuse_freed_memory
tuned = reuse_freed_memory() if sys.argv[1] == "tuned" else False
def faults_of_a_64_mib_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = np.ones(64 << 20, dtype=np.uint8)   # touches every page
    del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
first = faults_of_a_64_mib_buffer()
print(tuned, first, faults_of_a_64_mib_buffer())
"""


def run_probe(mode: str) -> tuple[bool, int, int]:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("GLIBC_TUNABLES", "MALLOC_"))}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    tuned, first, second = out.stdout.split()
    return tuned == "True", int(first), int(second)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_second_large_buffer_reuses_the_first():
    tuned, first, second = run_probe("tuned")
    if not tuned:
        pytest.skip("not glibc: mallopt unavailable")
    # (page faults, not pages: with transparent huge pages one fault maps 2 MiB)
    assert first > 0 and second <= max(8, 0.1 * first)   # the first buffer is new memory, the second reuses it
    _, first_default, second_default = run_probe("default")
    assert second_default > 0.5 * first_default    # glibc's default maps (and faults) it afresh: what the tuning removes


def test_user_settings_win(monkeypatch):
    from lnm_auto.utils.memory import reuse_freed_memory
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=1")
    assert reuse_freed_memory() is False
