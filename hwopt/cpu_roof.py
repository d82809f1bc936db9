"""The ceilings of a target: its peak rates, or this CPU's, measured by micro-benchmarks and cached.

A CPU target that gives no peaks (the built-in ``cpu``) is priced
with this machine's: a square matmul per dtype for the FLOP rate and a big
matrix-vector product for the bandwidth decode streams weights at, measured
once per machine and thread count and kept in ``$HWOPT_CACHE/cpu-roofs.json``.
A measurement taken while other processes left its threads too few cores
(``hwopt.timing.oversubscribed``) is used once, said to be low, and not kept:
the next command measures again.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import time
from pathlib import Path

from hwopt.roofline import Roof
from hwopt.targets import Target

CPU_BENCH_DTYPES = ("fp32", "bf16")  # what torch computes in on a CPU
BENCH_MATMUL = 1536  # square matmul side: big enough to reach the GEMM peak, about a second in all on 2 cores
BENCH_GEMV_MIB = 256  # far beyond any CPU cache
BENCH_REPEATS = 3


def roof_of(target: Target) -> Roof:
    """The target's peaks; for a CPU target that gives none, this machine's, measured once and cached."""
    if target.kind == "cpu" and target.bandwidth_gbs is None and not target.peak_tflops:
        import torch  # here: a target with datasheet peaks (every GPU's) is priced without torch

        return measured_cpu_roof(f"{target.description}, torch with {torch.get_num_threads()} threads")
    where = target.path.name if target.path else f"the {target.name} target"
    return Roof(dict(target.peak_tflops), target.bandwidth_gbs, f"the peaks of {target.description} in {where}")


def measured_cpu_roof(machine: str) -> Roof:
    """This machine's roof from the cache file (``$HWOPT_CACHE/cpu-roofs.json``), measured on a miss."""
    from hwopt.pipeline import cache_root

    return _cached_cpu_roof(machine, str(cache_root() / "cpu-roofs.json"))


@functools.cache
def _cached_cpu_roof(machine: str, cache_file: str) -> Roof:
    from hwopt.pipeline import atomic_write_text

    path = Path(cache_file)
    try:
        known = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # no cache yet, or a damaged one: measure again
        known = {}
    if machine not in known:
        import torch

        from hwopt.progress import console
        from hwopt.timing import CpuLoad, oversubscribed

        with CpuLoad() as load:
            roof = measure_cpu_roof(machine)
        if oversubscribed(load.others, torch.get_num_threads(), len(load.cores)):
            console.print(f"[yellow]warning: this CPU's peaks were measured while {load.describe()}: they are low, "
                          "and so are the estimates' speeds; they are not kept, so the next command measures again"
                          "[/yellow]", soft_wrap=True)
            return dataclasses.replace(roof, source=f"{roof.source}, while {load.describe()} (too low; not kept)")
        known[machine] = dataclasses.asdict(roof)
        atomic_write_text(path, json.dumps(known, indent=2) + "\n")
    return Roof(**known[machine])


def best_seconds(call) -> float:
    """The fastest of BENCH_REPEATS timed calls, after one warm-up call."""
    call()
    times = []
    for _ in range(BENCH_REPEATS):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_tflops(dtype: str) -> float:
    import torch

    from hwopt.steps import TORCH_DTYPES

    n = BENCH_MATMUL
    a, b = (torch.randn(n, n).to(TORCH_DTYPES[dtype]) for _ in range(2))
    return 2 * n**3 / best_seconds(lambda: a @ b) / 1e12


def gemv_gbs() -> float:
    """GB/s at which a matrix-vector product streams its matrix: the ceiling of decode, which reads weights so.

    A plain copy reaches a different (on small VMs, several times higher)
    figure than the GEMV kernels an LLM's decode actually runs.
    """
    import torch

    side = int((BENCH_GEMV_MIB * 2**20 // 4) ** 0.5)
    matrix, vector = torch.randn(side, side), torch.randn(side)
    return matrix.nbytes / best_seconds(lambda: matrix @ vector) / 1e9


def measure_cpu_roof(machine: str) -> Roof:
    """Micro-benchmarks (a couple of seconds): a square matmul per dtype, and a big fp32 matrix-vector product."""
    import torch

    with torch.inference_mode():
        peaks = {dtype: round(matmul_tflops(dtype), 5) for dtype in CPU_BENCH_DTYPES}
        bandwidth = round(gemv_gbs(), 2)
    source = (f"peaks measured by hwopt on {datetime.date.today().isoformat()} on {machine}: best of "
              f"{BENCH_REPEATS} {BENCH_MATMUL}x{BENCH_MATMUL} matmuls per dtype and {BENCH_GEMV_MIB} MiB matrix-vector "
              "products")
    return Roof(peaks, bandwidth, source)
