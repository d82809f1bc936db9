"""Built-in measurement backend ``onnxruntime``: each block exported to ONNX and run by ONNX Runtime on the CPU.

The step is exported once per phase with that phase's shapes
(``hwopt.onnx_export``) and run on the CPU execution provider with as many
threads as torch uses, so the two CPU backends are compared on equal terms.
Several InferenceSessions over the same file each hold their own copy of
the weights; they are run in turn, each with its own input
(``hwopt.workload.rotation``), so that no call reads weights the previous
one left in the cache. Timing is torch's (``wall_clock_timer``): warm-up
first, then rounds of one pass over the rotation per phase.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import onnxruntime
import torch

from hwopt.builtin.backend_torch import cpu_threads, wall_clock_timer
from hwopt.onnx_export import export_phases, named_inputs
from hwopt.timing import Timer
from hwopt.workload import Workload, kv_dtype_unsupported, rotation, rotation_size, step_inputs

PROVIDER = "CPUExecutionProvider"


def new_session(path: Path) -> onnxruntime.InferenceSession:
    """A session on the CPU with torch's thread count (one operator at a time, as torch runs them)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=[PROVIDER])


class OnnxRuntimeBackend:
    name = "onnxruntime"
    measures = True

    def available(self, target, scenario) -> tuple[bool, str]:
        if target.kind != "cpu":
            return False, (f"the onnxruntime backend runs ONNX Runtime's {PROVIDER}, so it times the cpu target, "
                           f"not {target.name} (use torch or tensorrt for a GPU)")
        if scenario.dtype != "fp32":
            return False, (f"ONNX Runtime's {PROVIDER} times fp32 blocks, not {scenario.dtype} "
                           "(it has no bf16 kernels for Mul or MatMul)")
        if why := kv_dtype_unsupported(scenario, self.name):
            return False, why
        return True, ""

    def describe(self, target, scenario) -> dict:
        return {"device": target.description,
                "backend": f"onnxruntime {onnxruntime.__version__} {PROVIDER}, {cpu_threads()}",
                "method": "wall clock around InferenceSession.run"}

    def prepare(self, workload: Workload, target) -> Timer:
        with tempfile.TemporaryDirectory(prefix="hwopt-onnxruntime-") as directory:
            step = export_phases(workload, Path(directory))
            if step is None:
                return lambda: [0.0] * len(workload.phases)
            copies = rotation_size(step.weight_bytes)
            generator = torch.Generator().manual_seed(0)
            phase_calls = []
            for phase, path in zip(workload.phases, step.paths):
                calls = []
                for session in rotation([new_session(path) for _ in range(copies)]):  # sessions hold the weights
                    inputs = named_inputs(workload, step_inputs(workload, phase, generator=generator))
                    feed = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
                    calls.append((functools.partial(session.run, None), (feed,)))
                phase_calls.append(calls)
            return wall_clock_timer(phase_calls)

