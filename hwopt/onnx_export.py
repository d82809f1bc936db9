"""A workload's step as ONNX: what the onnxruntime and tensorrt backends run.

The step module (``hwopt.steps.build_step``) is exported once per phase,
with that phase's shapes fixed: prefill and each decode context get their
own file, so a runtime can plan every phase for its exact shapes. Inputs and
outputs carry stable names (``x``, ``cos``, ``sin``, ``past_keys``,
``past_values`` → ``y``, ``keys``, ``values``; the outside step
``input_ids``, ``positions`` → ``next_token``, ``cos``, ``sin``), so a
runtime binds its buffers by name.

The exporter is torch.onnx's dynamo exporter (``torch.export``, translated
by onnxscript). The TorchScript exporter (``dynamo=False``) is deprecated
since torch 2.9 and cannot export grouped-query attention: tracing turns
the ``is_causal`` flag of scaled_dot_product_attention into a tensor.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from hwopt.steps import build_step, step_inputs, weight_bytes
from hwopt.workload import Phase, Workload

# Pinned so that a newer torch does not quietly emit operators that an installed runtime cannot read.
OPSET = 20
SUB_BLOCK_INPUTS = ("x", "cos", "sin", "past_keys", "past_values")
OUTSIDE_INPUTS = ("input_ids", "positions")


def input_names(workload: Workload, count: int) -> list[str]:
    """Names of the first ``count`` inputs of the step (``step_inputs`` gives them in this order)."""
    return list((OUTSIDE_INPUTS if workload.variant is None else SUB_BLOCK_INPUTS)[:count])


def output_names(workload: Workload) -> list[str]:
    if workload.variant is None:
        return ["next_token", "cos", "sin"]
    if workload.kv_cache.elements_per_token:
        return ["y", "keys", "values"]
    return ["y"]


def named_inputs(workload: Workload, inputs: tuple) -> dict[str, torch.Tensor]:
    """``step_inputs`` keyed by their ONNX input names."""
    return dict(zip(input_names(workload, len(inputs)), inputs))


@contextlib.contextmanager
def quiet_exporter():
    """Silence what the exporter prints on every call (missing torchvision ops, torch-internal deprecations)."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        log.setLevel(level)


def export_step(module: torch.nn.Module, workload: Workload, phase: Phase, path: Path) -> Path:
    """Write ``module`` as ONNX for one phase's shapes; large weights go to ``<path>.data`` beside it."""
    inputs = step_inputs(workload, phase)
    with quiet_exporter():
        torch.onnx.export(module, inputs, path, dynamo=True, verbose=False, opset_version=OPSET,
                          input_names=input_names(workload, len(inputs)), output_names=output_names(workload),
                          external_data=True)
    return path


@dataclass(frozen=True)
class ExportedStep:
    paths: tuple[Path, ...]  # one ONNX file per phase of the workload, in order
    weight_bytes: int  # what one copy of the weights takes (for hwopt.workload.rotation_size)


def export_phases(workload: Workload, directory: Path) -> ExportedStep | None:
    """Export the workload's step for each of its phases into ``directory``; None for a sub-block that is nothing."""
    module = build_step(workload)
    if module is None:
        return None
    paths = tuple(export_step(module, workload, phase, directory / f"{workload.name}_{i}_{phase.name}.onnx")
                  for i, phase in enumerate(workload.phases))
    return ExportedStep(paths, weight_bytes(module))
