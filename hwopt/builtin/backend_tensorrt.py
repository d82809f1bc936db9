"""Built-in measurement backend ``tensorrt``: each block built into a TensorRT engine for the target GPU.

The step is exported to ONNX once per phase, with that phase's shapes
(``hwopt.onnx_export``), in the scenario's dtype; TensorRT's ONNX parser
reads it and the builder makes an engine for the GPU at hand, choosing its
kernels for exactly those shapes. How the engine gets its precision differs
between TensorRT 10 and 11 (``engine_build_plan``).

Several engines deserialized from the same plan each hold their own copy of
the weights; they run in turn, each with its own input
(``hwopt.workload.rotation``), so that no call reads weights the previous
one left in the GPU's L2 cache. The ``execute_async_v3`` calls of one pass
round the rotation are timed by CUDA events: warm-up first, then one pass
per phase in each round of the timer ``prepare`` returns.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from hwopt.builtin.backend_torch import WARMUP, cuda_events_ms, gpu_name, target_gpu_missing
from hwopt.errors import HwoptError
from hwopt.lowering.tensorrt_engine import build_engine, engine_build_plan, major_version
from hwopt.onnx_export import export_phases, named_inputs
from hwopt.timing import Timer
from hwopt.workload import Workload, kv_dtype_unsupported, rotation, rotation_size, step_inputs

MIN_MAJOR = 10  # the name-based tensor API (set_tensor_address, execute_async_v3)
NOT_INSTALLED = ("tensorrt is not installed (pip install 'hwopt[tensorrt]'; its wheels download from NVIDIA's "
                 "package index, pypi.nvidia.com)")


def bind(trt, engine, inputs: dict[str, torch.Tensor]) -> tuple:
    """An execution context with a CUDA buffer bound to every I/O tensor; returns (context, buffers).

    Tensors are looked up by the engine's own names: TensorRT drops an
    input the graph does not use (a linear attention's ``cos`` and ``sin``).
    The buffers are returned so that they live as long as the context.
    """
    dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
              trt.DataType.BF16: torch.bfloat16, trt.DataType.INT32: torch.int32,
              trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
    context = engine.create_execution_context()
    buffers = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = dtypes[engine.get_tensor_dtype(name)]
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            tensor = inputs[name].to(dtype).contiguous()
        else:
            tensor = torch.empty(tuple(engine.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, tensor.data_ptr())
        buffers.append(tensor)
    return context, buffers


def contexts_timer(phase_contexts: list[list], keep_alive: list) -> Timer:
    """A timer whose round runs, for each phase, one pass round its rotation of execution contexts.

    ``keep_alive`` holds the engines and bound buffers the contexts use.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were written on the default stream
    launches = [[functools.partial(context.execute_async_v3, stream.cuda_stream) for context in contexts]
                for contexts in phase_contexts]
    for phase_launches in launches:
        for launch in phase_launches:
            for _ in range(WARMUP):
                launch()

    def one_round(_held=keep_alive) -> list[float]:  # the closure keeps the engines and buffers alive
        return [cuda_events_ms(phase_launches, stream) for phase_launches in launches]

    return one_round


class TensorRTBackend:
    name = "tensorrt"
    measures = True

    def available(self, target, scenario) -> tuple[bool, str]:
        if target.kind != "gpu":
            return False, f"TensorRT builds engines for NVIDIA GPUs, and the target {target.name} is a CPU"
        try:
            import tensorrt as trt
        except ModuleNotFoundError:
            return False, NOT_INSTALLED
        except ImportError as exc:  # installed, but its libraries do not load
            return False, f"tensorrt is installed but cannot be imported: {exc}"
        if major_version(trt) < MIN_MAJOR:
            return False, f"tensorrt {trt.__version__} is too old: the tensorrt backend needs TensorRT {MIN_MAJOR}+"
        if why := target_gpu_missing(target):
            return False, why
        try:
            engine_build_plan(major_version(trt), scenario.dtype)
        except HwoptError as exc:
            return False, str(exc)
        if why := kv_dtype_unsupported(scenario, self.name):
            return False, why
        return True, ""

    def describe(self, target, scenario) -> dict:
        import tensorrt as trt

        return {"device": gpu_name(), "backend": f"TensorRT {trt.__version__}, CUDA {torch.version.cuda}",
                "method": "CUDA events around execute_async_v3"}

    def prepare(self, workload: Workload, target) -> Timer:
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        plan = engine_build_plan(major_version(trt), workload.dtype)
        runtime = trt.Runtime(logger)
        generator = torch.Generator("cuda").manual_seed(0)
        with tempfile.TemporaryDirectory(prefix="hwopt-tensorrt-") as directory:
            step = export_phases(workload, Path(directory))
            if step is None:
                return lambda: [0.0] * len(workload.phases)
            copies = rotation_size(step.weight_bytes)
            phase_contexts, keep_alive = [], []
            for phase, path in zip(workload.phases, step.paths):
                serialized = build_engine(trt, logger, path, plan)
                engines = [runtime.deserialize_cuda_engine(serialized) for _ in range(copies)]
                bound = [bind(trt, engine, named_inputs(workload, step_inputs(workload, phase, "cuda", generator)))
                         for engine in rotation(engines)]
                phase_contexts.append([context for context, _ in bound])
                keep_alive += [runtime, engines, bound]
            return contexts_timer(phase_contexts, keep_alive)

