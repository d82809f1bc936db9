"""Built-in measurement backend ``torch``: eager PyTorch, on this machine's CPU or on its GPU.

On the CPU a call is timed by the wall clock. On a GPU each call is captured
once as a CUDA graph, so what is timed is the kernels and not Python's
launch overhead (a serving engine launches graphs too), and the replays are
timed by CUDA events. Either way: warm-up first; then each round of the
timer ``prepare`` returns is one pass over the whole rotation of weight
copies and inputs (``hwopt.workload.rotation``), so that no call is served
from a cache the previous one warmed. The profile interleaves the rounds of
every variant and takes medians (``hwopt.timing``).
"""

from __future__ import annotations

import math
import time

import torch

from hwopt.steps import build_step, step_inputs, weight_bytes
from hwopt.timing import Timer, usable_cores
from hwopt.workload import Workload, kv_dtype_unsupported, rotation, rotation_size

WARMUP = 2
MIN_ROUND_MS = 20.0  # wall-clock time of each phase in a round, at least
CPU_DTYPES = ("fp32", "bf16")
GPU_DTYPES = ("fp32", "bf16", "fp16")


def gpu_name() -> str | None:
    """The name of torch's current GPU (``hwopt calibrate --device cuda:N`` sets it), or None without one."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def target_gpu_missing(target) -> str | None:
    """Why the target's GPU cannot be used here (None: it is this machine's GPU)."""
    found = gpu_name()
    if found is None:
        return f"no GPU here (torch {torch.__version__}: torch.cuda.is_available() is False)"
    if not target.recognises(found):
        return f"this machine's GPU is {found}, not the target {target.description}"
    return None


def cpu_threads() -> str:
    """The threads torch times with on the CPU, beside the cores this process may use (``hwopt.timing``)."""
    threads = torch.get_num_threads()
    return f"{threads} thread{'s' if threads > 1 else ''} on {len(usable_cores())} usable cores"


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
            return {"device": target.description, "backend": f"torch {torch.__version__}, {cpu_threads()}",
                    "method": "wall clock"}
        return {"device": gpu_name(), "backend": f"torch {torch.__version__}, CUDA {torch.version.cuda}",
                "method": "CUDA events around CUDA-graph replays"}

    def prepare(self, workload: Workload, target) -> Timer:
        device = "cuda" if target.kind == "gpu" else "cpu"
        first = build_step(workload, device)
        if first is None:
            return lambda: [0.0] * len(workload.phases)
        copies = [first] + [build_step(workload, device) for _ in range(rotation_size(weight_bytes(first)) - 1)]
        generator = torch.Generator(device).manual_seed(0)
        phase_calls = [[(module, step_inputs(workload, phase, device, generator)) for module in rotation(copies)]
                       for phase in workload.phases]
        return cuda_graph_timer(phase_calls) if device == "cuda" else wall_clock_timer(phase_calls)


def wall_clock_timer(phase_calls: list[list[tuple]]) -> Timer:
    """A timer whose round makes, for each phase, whole passes round its rotation of ``(call, args)``.

    Each call runs on the next module (or session) and input of the
    rotation, so none reads weights the previous one left warm; a round
    gives the mean wall-clock milliseconds of one call per phase. A phase
    makes as many passes a round as last MIN_ROUND_MS (sized once, after the
    warm-up, as ``torch.utils.benchmark`` sizes its blocks), so that a
    scheduler tick is a small part of any round.
    """
    with torch.inference_mode():
        for calls in phase_calls:
            for call, args in calls[:WARMUP]:
                call(*args)
        passes = [max(1, math.ceil(MIN_ROUND_MS / max(pass_ms(calls), 1e-3))) for calls in phase_calls]

    @torch.inference_mode()
    def one_round() -> list[float]:
        return [sum(pass_ms(calls) for _ in range(n)) / (n * len(calls)) for calls, n in zip(phase_calls, passes)]

    return one_round


def pass_ms(calls: list[tuple]) -> float:
    """Wall-clock milliseconds of one pass over ``calls``."""
    start = time.perf_counter()
    for call, args in calls:
        call(*args)
    return (time.perf_counter() - start) * 1e3


def cuda_events_ms(launches: list, stream: torch.cuda.Stream | None = None) -> float:
    """Milliseconds per launch of one pass over ``launches`` (callables that queue GPU work on ``stream``)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    for launch in launches:
        launch()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / len(launches)


@torch.inference_mode()
def cuda_graph_timer(phase_calls: list[list[tuple]]) -> Timer:
    """A timer whose round replays, for each phase, one CUDA graph per call of its rotation (CUDA events)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
        for calls in phase_calls:
            for module, inputs in calls:
                for _ in range(WARMUP):
                    module(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    phase_graphs = []
    for calls in phase_calls:
        graphs = []
        for module, inputs in calls:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                module(*inputs)
            graphs.append(graph)
        phase_graphs.append(graphs)
    return lambda: [cuda_events_ms([graph.replay for graph in graphs]) for graphs in phase_graphs]

