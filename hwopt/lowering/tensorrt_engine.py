"""A TensorRT engine of the whole child for one target GPU and dtype, built from its KV-cache ONNX.

The engine is named ``<model>.<target>.<dtype>.engine`` and has a manifest
beside it (``<engine>.json``: target, the device's NVML name, dtype,
scenario, TensorRT version, date). Its one optimization profile covers the
scenario: batch 1 to ``batch``, new tokens 1 to ``input_len``, cached tokens
0 to ``input_len + output_len``. How precision is set differs between
TensorRT 10 and 11 (``engine_build_plan``); the tensorrt measurement backend builds its engines here too.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

from hwopt.errors import HwoptError

ENGINE_DTYPES = ("fp32", "fp16", "bf16")
WORKSPACE_BYTES = 4 * 2**30  # scratch memory a layer's kernels may use; the default is the whole GPU


@dataclass(frozen=True)
class BuildPlan:
    strongly_typed: bool  # create the network with NetworkDefinitionCreationFlag.STRONGLY_TYPED
    precision_flags: tuple[str, ...]  # names of trt.BuilderFlag members to set on the builder config


def engine_build_plan(trt_major: int, dtype: str) -> BuildPlan:
    """How to build a ``dtype`` engine from an ONNX graph exported in ``dtype``.

    TensorRT 10 types a network weakly by default: a builder flag (FP16,
    BF16) allows kernels in that precision, fp32 needs none (TF32 is on by
    default). TensorRT 11 removed those flags: every network is strongly
    typed and computes in the types the graph itself carries. fp8 needs
    quantize/dequantize nodes in the graph in either version.
    """
    if dtype not in ENGINE_DTYPES:
        raise HwoptError(f"hwopt builds TensorRT engines in {', '.join(ENGINE_DTYPES)}, not {dtype} "
                         "(that needs quantize/dequantize nodes in the ONNX graph, which hwopt does not insert)")
    if trt_major >= 11:
        return BuildPlan(strongly_typed=True, precision_flags=())
    return BuildPlan(strongly_typed=False, precision_flags={"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",)}[dtype])


def major_version(trt) -> int:
    return int(trt.__version__.split(".")[0])


def build_engine(trt, logger, onnx_path: Path, plan: BuildPlan, profile_shapes: dict | None = None) -> bytes:
    """A serialized engine for this GPU from an ONNX file.

    A graph with dynamic dimensions needs ``profile_shapes``: input name →
    (min, opt, max) shapes, one optimization profile.
    """
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise HwoptError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    for flag in plan.precision_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if profile_shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise HwoptError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    return serialized


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
            "built": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


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
