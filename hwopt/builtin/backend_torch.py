"""Built-in measurement backend ``torch``: eager PyTorch, on this machine's CPU or on its GPU.

On the CPU a call is timed by the wall clock. On a GPU each call is captured
once as a CUDA graph, so what is timed is the kernels and not Python's
launch overhead (a serving engine launches graphs too), and the replays are
timed by CUDA events. Either way: warm-up first, then the median of
``repeats`` timings, each over the whole rotation of weight copies and
inputs (``hwopt.workload.rotation``) so that no call is served from a cache
the previous one warmed.
"""

from __future__ import annotations

import statistics
import time

import torch

from hwopt.hookspecs import hookimpl
from hwopt.workload import (
    Workload,
    build_step,
    kv_dtype_unsupported,
    rotation,
    rotation_size,
    step_inputs,
    weight_bytes,
)

WARMUP = 2
CPU_DTYPES = ("fp32", "bf16")
GPU_DTYPES = ("fp32", "bf16", "fp16")


def gpu_name() -> str | None:
    """The name of the GPU torch sees, or None without one."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def target_gpu_missing(target) -> str | None:
    """Why the target's GPU cannot be used here (None: it is this machine's GPU)."""
    found = gpu_name()
    if found is None:
        return f"no GPU here (torch {torch.__version__}: torch.cuda.is_available() is False)"
    if not target.recognises(found):
        return f"this machine's GPU is {found}, not the target {target.description}"
    return None


class TorchBackend:
    name = "torch"
    measures = True

    def available(self, target, scenario) -> tuple[bool, str]:
        if why := kv_dtype_unsupported(scenario, self.name):
            return False, why
        if target.kind == "cpu":
            if scenario.dtype not in CPU_DTYPES:
                return False, f"torch on the CPU runs {', '.join(CPU_DTYPES)}, not {scenario.dtype}"
            return True, ""
        if why := target_gpu_missing(target):
            return False, why
        if scenario.dtype not in GPU_DTYPES:
            return False, f"eager torch runs {', '.join(GPU_DTYPES)} blocks, not {scenario.dtype} (use tensorrt)"
        return True, ""

    def describe(self, target, scenario) -> dict:
        if target.kind == "cpu":
            return {"device": target.description,
                    "backend": f"torch {torch.__version__}, {torch.get_num_threads()} threads",
                    "method": "wall clock"}
        return {"device": gpu_name(), "backend": f"torch {torch.__version__}, CUDA {torch.version.cuda}",
                "method": "CUDA events around CUDA-graph replays"}

    @torch.inference_mode()
    def time_phases(self, workload: Workload, target, repeats: int) -> list[float]:
        device = "cuda" if target.kind == "gpu" else "cpu"
        first = build_step(workload, device)
        if first is None:
            return [0.0] * len(workload.phases)
        copies = [first] + [build_step(workload, device) for _ in range(rotation_size(weight_bytes(first)) - 1)]
        generator = torch.Generator(device).manual_seed(0)
        timer = time_cuda_graphs if device == "cuda" else time_wall_clock
        out = []
        for phase in workload.phases:
            calls = [(module, step_inputs(workload, phase, device, generator)) for module in rotation(copies)]
            out.append(timer(calls, repeats))
        return out


def time_wall_clock(calls: list[tuple], repeats: int) -> float:
    """Median milliseconds of one call, each call on the next module and input of the rotation."""
    for module, inputs in calls[:WARMUP]:
        module(*inputs)
    times = []
    for r in range(WARMUP, WARMUP + repeats):  # go on round the rotation, never back to a warm copy
        module, inputs = calls[r % len(calls)]
        start = time.perf_counter()
        module(*inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_cuda_graphs(calls: list[tuple], repeats: int) -> float:
    """Median milliseconds of one call: each call captured as a CUDA graph, replays timed by CUDA events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
        for module, inputs in calls:
            for _ in range(WARMUP):
                module(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for module, inputs in calls:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            module(*inputs)
        graphs.append(graph)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for graph in graphs:
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(graphs))
    return statistics.median(times)


@hookimpl
def hwopt_register_backends(register):
    register(TorchBackend())
