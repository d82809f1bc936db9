"""A TensorRT engine of the whole child for one target GPU and dtype, built from its KV-cache ONNX.

The engine is named ``<model>.<target>.<dtype>.engine`` and has a manifest
beside it (``<engine>.json``: target, the device's NVML name, dtype,
scenario, TensorRT version, date). Its one optimization profile covers the
scenario: batch 1 to ``batch``, new tokens 1 to ``input_len``, cached tokens
0 to ``input_len + output_len``. How precision is set differs between
TensorRT 10 and 11 (``hwopt.builtin.backend_tensorrt.engine_build_plan``).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from hwopt.builtin.backend_tensorrt import build_engine, engine_build_plan, major_version


def engine_file_name(model_name: str, target: str, dtype: str) -> str:
    return f"{model_name}.{target}.{dtype}.engine"


def profile_shapes(onnx_inputs: dict[str, tuple], scenario) -> dict[str, tuple]:
    """(min, opt, max) shape of every input, from the ONNX inputs' fixed dims (name → shape, None where dynamic).

    ``opt`` is a decode step of the whole batch halfway through its output:
    what the engine runs most.
    """
    batch, prompt, context = scenario.batch, scenario.input_len, scenario.max_context
    halfway = scenario.input_len + scenario.output_len // 2
    out = {}
    for name, shape in onnx_inputs.items():
        if name.startswith("past_key_values."):  # [batch, kv_heads, past, head_dim]
            kv_heads, width = shape[1], shape[3]
            out[name] = ((1, kv_heads, 0, width), (batch, kv_heads, halfway, width),
                         (batch, kv_heads, context - 1, width))
        elif name == "attention_mask":  # [batch, past + new]
            out[name] = ((1, 1), (batch, halfway + 1), (batch, context))
        else:  # input_ids, position_ids: [batch, new]
            out[name] = ((1, 1), (batch, 1), (batch, prompt))
    return out


def onnx_input_shapes(onnx_path: Path) -> dict[str, tuple]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return {i.name: tuple(d.dim_value or None for d in i.type.tensor_type.shape.dim) for i in graph.input}


def manifest(target, device: str, dtype: str, scenario, trt_version: str, engine: str) -> dict:
    return {"engine": engine, "target": target.name, "device": device, "dtype": dtype,
            "scenario": scenario.to_json(), "tensorrt": trt_version,
            "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def build_tensorrt_engine(onnx_path: Path, out_dir: Path, model_name: str, target, scenario, device: str) -> Path:
    """Build and write the engine and its manifest; returns the engine's path. Needs TensorRT and the GPU."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    plan = engine_build_plan(major_version(trt), scenario.dtype)
    serialized = build_engine(trt, logger, onnx_path, plan, profile_shapes(onnx_input_shapes(onnx_path), scenario))
    path = Path(out_dir) / engine_file_name(model_name, target.name, scenario.dtype)
    path.write_bytes(bytes(serialized))
    info = manifest(target, device, scenario.dtype, scenario, trt.__version__, path.name)
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return path
