"""This machine: what it is (CPU, cores, RAM, library versions) and how fast it multiplies fp32 matrices."""
from __future__ import annotations

import os
import platform
import statistics
import time


def matmul_peak_flops(*, n: int = 2048, reps: int = 30, threads: int | None = None) -> float:
    """Median FLOP/s of an n x n @ n x n fp32 matmul (2 n^3 FLOPs each), after one warm-up, at `threads` threads.

    30 repetitions (about 1.5 s on 2 cores): 7 gave 213 and 362 GFLOP/s minutes apart on the same idle VM.
    """
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g)  # (n, n)
        b = torch.randn(n, n, generator=g)  # (n, n)
        torch.mm(a, b)  # warm-up: thread pool start, page faults
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        return 2 * n**3 / statistics.median(times)
    finally:
        torch.set_num_threads(before)


def _cpuinfo(key: str) -> str | None:
    """The first value of `key` in /proc/cpuinfo; None off Linux."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == key:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC 7B13"), else what the platform says."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def has_amx() -> bool:
    """Whether the CPU has AMX tiles (Intel Sapphire Rapids and later), which multiply bf16 and int8 matrices many
    times faster: the same run takes noticeably less time there."""
    return "amx_tile" in (_cpuinfo("flags") or "").split()


def cpu_label() -> str:
    """The CPU as a stated time names it: "AMD EPYC 7B13 without AMX"."""
    return f"{cpu_name()} {'with' if has_amx() else 'without'} AMX"


def _ram_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        return None


def describe(threads: int) -> dict:
    """The `hardware` block of a benchmark result."""
    import torch
    import transformers

    info = {"cpu": cpu_name(), "amx": has_amx(), "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "ram_gb": _ram_gb(), "threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    return info
