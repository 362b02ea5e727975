"""server/omp.py: a thread gives its OpenMP pool back and a helper thread opens none. Pools are
counted as OS threads (/proc/self/task) in a fresh interpreter, where no other test's pool is
alive. (The engine's side: tests/server/engine/test_engine_load_thread.py.)"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from adapterctl.server import omp

pytestmark = pytest.mark.skipif(omp.libgomp() is None or (os.cpu_count() or 1) < 2,
                                reason="needs torch's libgomp (Linux) and 2+ CPUs")

SCRIPT = r"""
import os, threading
try:
    import sentencepiece  # vendors a libgomp of its own: release_pool must find torch's
except ImportError:
    pass
import torch
from adapterctl.server import omp
tasks = lambda: len(os.listdir("/proc/self/task"))
big = torch.randn(1 << 22)
def work():
    for _ in range(3):
        (big * 2).sum()
before = tasks()
work()  # the main thread opens its pool
with_pool = tasks()
released = omp.release_pool()
after_release = tasks()
seen = {}
def helper():
    omp.serial_thread()
    seen["threads"] = torch.get_num_threads()
    start = tasks()
    work()
    seen["new"] = tasks() - start
t = threading.Thread(target=helper); t.start(); t.join()
print(before, with_pool, released, after_release, seen["threads"], seen["new"], torch.get_num_threads())
"""


def test_a_thread_gives_its_pool_back_and_a_helper_opens_none():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    before, with_pool, released, after_release, helper_threads, helper_new, main_threads = out.stdout.split()
    assert int(with_pool) > int(before)  # the main thread's parallel ops started pool workers
    assert released == "True" and int(after_release) == int(before)  # ... which release_pool ended
    assert helper_threads == "1" and helper_new == "0"  # serial on the helper, no pool opened there
    assert main_threads == "2"  # the helper's setting stayed on the helper
