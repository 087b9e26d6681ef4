"""The allocator setting: freed memory stays in the process when tuned, goes back to the kernel when not."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json, os, sys
import numpy as np
from dpolab.runtime import tune_allocator

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

tuned = tune_allocator()
again = tune_allocator()
a = np.ones(20 * 2**20 // 8)  # 20 MB, touched
held = rss_mb()
del a
print(json.dumps({"tuned": tuned, "again": again, "released_mb": held - rss_mb()}))
"""


def _child(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DPOLAB_TUNE_MALLOC"}
    if env_value is not None:
        env["DPOLAB_TUNE_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_tuned_allocator_keeps_freed_memory_and_can_be_turned_off():
    on, off = _child(None), _child("0")
    assert on["tuned"] is True and on["again"] is True
    assert on["released_mb"] < 2          # a freed 20 MB block stays mapped
    assert off["tuned"] is False and off["again"] is False
    assert off["released_mb"] > 15        # glibc's default unmaps it at once
