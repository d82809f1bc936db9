"""Engines from the child: ONNX with its KV cache (checked by ONNX Runtime), TensorRT build plans, AOTInductor."""

from __future__ import annotations

import onnx
import pytest
import torch
from conftest import hwopt_cli, tiny_child

from hwopt.lowering.aoti import empty_past, export_aoti, run_aoti_step
from hwopt.lowering.onnx_kv import OnnxRuntimeModel, export_onnx, kv_layers
from hwopt.lowering.tensorrt_engine import (
    BuildPlan,
    engine_build_plan,
    engine_file_name,
    manifest,
    onnx_input_shapes,
    profile_shapes,
)
from hwopt.model.checkpoint import load_checkpoint, save_nemotron_nas
from hwopt.model.modeling import KVCache
from hwopt.plugins import block_types
from hwopt.search_space import Scenario
from hwopt.targets import resolve_target


@pytest.fixture(scope="module")
def child():
    return tiny_child()


@pytest.fixture(scope="module")
def onnx_path(child, tmp_path_factory):
    return export_onnx(child, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_onnx_names_follow_optimum(child, onnx_path):
    onnx.checker.check_model(str(onnx_path), full_check=True)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    assert kv_layers(child) == [1, 2, 4]  # layer 0 is linear, layer 3 has no attention: neither caches
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs[3:] == [f"past_key_values.{i}.{kind}" for i in (1, 2, 4) for kind in ("key", "value")]
    assert outputs == ["logits", *(f"present.{i}.{kind}" for i in (1, 2, 4) for kind in ("key", "value"))]
    kv_heads = {i.name: i.type.tensor_type.shape.dim[1].dim_value for i in graph.input if "past" in i.name}
    assert kv_heads["past_key_values.1.key"] == 2 and kv_heads["past_key_values.2.key"] == 1  # each layer its own


def test_onnx_runtime_matches_torch_over_prefill_and_8_decode_steps(child, onnx_path):
    session = OnnxRuntimeModel(onnx_path)
    prompts = torch.randint(0, 211, (3, 6))  # another batch size and length than the export's example
    cache = KVCache(len(child.model.layers))
    ids = prompts
    with torch.no_grad():
        for _ in range(9):
            expected = child(ids, past_key_values=cache).logits
            got = torch.from_numpy(session.step(ids.numpy()))
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
            ids = expected[:, -1:].argmax(-1)
    assert cache.length == 6 + 8


def test_tensorrt_profile_covers_the_scenario(onnx_path):
    shapes = profile_shapes(onnx_input_shapes(onnx_path), Scenario(batch=4, input_len=100, output_len=20))
    assert shapes["input_ids"] == ((1, 1), (4, 1), (4, 100))  # decode steps most, the prompt at most
    assert shapes["attention_mask"] == ((1, 1), (4, 111), (4, 120))
    assert shapes["past_key_values.2.key"] == ((1, 1, 0, 16), (4, 1, 110, 16), (4, 1, 119, 16))  # layer 2: 1 KV head
    assert set(shapes) == {"input_ids", "attention_mask", "position_ids",
                           *(f"past_key_values.{i}.{k}" for i in (1, 2, 4) for k in ("key", "value"))}


@pytest.mark.parametrize("major, dtype, typed, flags", [(10, "bf16", False, ("BF16",)), (10, "fp32", False, ()),
                                                        (11, "bf16", True, ()), (11, "fp16", True, ())])
def test_tensorrt_build_plan_for_10_and_11(major, dtype, typed, flags):
    assert engine_build_plan(major, dtype) == BuildPlan(strongly_typed=typed, precision_flags=flags)


def test_tensorrt_engine_name_and_manifest():
    h100 = resolve_target("h100")
    scenario = Scenario(batch=8, dtype="bf16", kv_dtype="bf16")
    name = engine_file_name("smollm2-child", h100.name, "bf16")
    assert name == "smollm2-child.h100-sxm.bf16.engine"
    info = manifest(h100, "NVIDIA H100 80GB HBM3", "bf16", scenario, "10.9.0", name)
    assert info["target"] == "h100-sxm" and info["device"] == "NVIDIA H100 80GB HBM3" and info["tensorrt"] == "10.9.0"
    assert info["scenario"]["batch"] == 8 and info["built"].startswith("20")


def test_lowering_to_tensorrt_without_it_says_why_in_one_line(tmp_path):
    """TensorRT and a GPU are absent here: the CLI says so on one line, exits 2, and writes nothing."""
    child = tiny_child()
    save_nemotron_nas(child, tmp_path / "child")
    proc = hwopt_cli("lower", "--model", tmp_path / "child", "--format", "nemotron-nas,tensorrt", "--target", "h100",
                     "--runtime", "hwopt", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "cannot lower to tensorrt here:" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_hwopt_lower_any_checkpoint_to_onnx_and_nemotron_nas(tiny_llama_dir, tmp_path):
    proc = hwopt_cli("lower", "--model", tiny_llama_dir, "--format", "nemotron-nas,onnx", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "onnx/model.onnx").is_file() and (tmp_path / "onnx/tokenizer.json").is_file()
    assert (tmp_path / "nemotron-nas/modeling_nemotron_nas.py").is_file()
    ours = load_checkpoint(tmp_path / "nemotron-nas", block_types())
    parent = load_checkpoint(tiny_llama_dir, block_types())
    ids = torch.randint(0, 49152, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, parent(ids).logits, atol=1e-5, rtol=0)
    bad = hwopt_cli("lower", "--model", tiny_llama_dir, "--format", "mlx", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "unknown format 'mlx'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow  # AOTInductor compiles C++: about two minutes on two cores
def test_aoti_package_matches_eager_over_prefill_and_decode(child, tmp_path):
    package = export_aoti(child, tmp_path / "model.cpu.pt2")
    runner = torch._inductor.aoti_load_package(str(package))
    ids, past, cached = torch.randint(0, 211, (2, 5)), empty_past(child, 2), 0
    cache = KVCache(len(child.model.layers))
    with torch.no_grad():
        for _ in range(4):
            logits, past = run_aoti_step(runner, ids, past, cached)
            torch.testing.assert_close(logits, child(ids, past_key_values=cache).logits, atol=1e-4, rtol=0)
            cached += ids.shape[1]
            ids = logits[:, -1:].argmax(-1)
