"""Engines from the child: ONNX with its KV cache (checked by ONNX Runtime), TensorRT build plans, AOTInductor."""

from __future__ import annotations

import onnx
import pytest
import torch

from hwopt.lowering.onnx_kv import OnnxRuntimeModel, export_onnx, kv_layers
from hwopt.model.modeling import KVCache
from conftest import tiny_child


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
