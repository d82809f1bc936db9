"""The ONNX-based measurement backends: the exported graphs compute what torch does, ONNX Runtime times them,
and TensorRT says why it cannot run here (its builder settings are checked without it)."""

from __future__ import annotations

import contextlib
import importlib.util
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from hwopt.builtin.backend_onnxruntime import OnnxRuntimeBackend, new_session
from hwopt.builtin.backend_tensorrt import TensorRTBackend
from hwopt.builtin.backend_torch import TorchBackend
from hwopt.errors import HwoptError
from hwopt.lowering.tensorrt_engine import BuildPlan, engine_build_plan
from hwopt.onnx_export import export_step, named_inputs, output_names
from hwopt.search_space import Scenario, SearchSpace, sub_variants
from hwopt.steps import build_step, step_inputs
from hwopt.targets import resolve_target
from hwopt.timing import median_phases
from hwopt.workload import Workload, scenario_phases

CONFIG = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                     num_hidden_layers=2, vocab_size=256, head_dim=16)
SCENARIO = Scenario(batch=2, input_len=8, output_len=2)  # a prefill of 8 tokens, then one decode step
PHASES = {phase.name: phase for phase in scenario_phases(SCENARIO)}
VARIANTS = {v.name: v for kind in ("attention", "ffn") for v in sub_variants(CONFIG, SearchSpace(), kind)}


def workload(name: str, dtype: str = "fp32") -> Workload:
    variant = None if name == "outside_layers" else VARIANTS[name]
    return Workload(variant, CONFIG, dtype, dtype, tuple(PHASES.values()))


@pytest.mark.parametrize("name, phase", [
    ("kv2", "prefill"),  # the parent's grouped-query attention: keys and values out
    ("kv1", "decode"),  # with a cache: past keys and values in, grown ones out
    ("attn_linear", "prefill"),
    ("ffn128", "prefill"),  # SwiGLU
    ("ffn_linear", "decode"),
    ("outside_layers", "decode"),
])
def test_exported_step_computes_what_torch_does(tmp_path, name, phase):
    wl, ph = workload(name), PHASES[phase]
    module = build_step(wl)
    path = export_step(module, wl, ph, tmp_path / "step.onnx")
    session = new_session(path)
    assert [o.name for o in session.get_outputs()] == output_names(wl)

    inputs = step_inputs(wl, ph, generator=torch.Generator().manual_seed(1))  # not the export's example inputs
    feed = named_inputs(wl, inputs)
    got = session.run(None, {i.name: feed[i.name].numpy() for i in session.get_inputs()})
    with torch.no_grad():
        expected = module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(got) == len(expected)
    for out, ref in zip(got, expected):
        assert out.shape == tuple(ref.shape)
        np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-5)


def test_onnxruntime_uses_torchs_thread_count(tmp_path):
    wl = workload("ffn_linear")
    path = export_step(build_step(wl), wl, PHASES["prefill"], tmp_path / "step.onnx")
    assert new_session(path).get_session_options().intra_op_num_threads == torch.get_num_threads()
    describe = OnnxRuntimeBackend().describe(resolve_target("cpu"), SCENARIO)
    assert f"CPUExecutionProvider, {torch.get_num_threads()} thread" in describe["backend"]


@contextlib.contextmanager
def one_thread():
    """Time on one thread: on a busy shared machine, a descheduled worker thread stalls every parallel call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def median_ms(backend, wl: Workload, rounds: int) -> list[float]:
    """Per phase, the median of ``rounds`` rounds of the backend's timer."""
    timer = backend.prepare(wl, resolve_target("cpu"))
    return median_phases([timer() for _ in range(rounds)])


@pytest.fixture(scope="module")
def onnxruntime_swiglu_ms() -> list[float]:
    with one_thread():
        return median_ms(OnnxRuntimeBackend(), workload("ffn128"), rounds=20)


def test_onnxruntime_times_every_phase(onnxruntime_swiglu_ms):
    assert len(onnxruntime_swiglu_ms) == len(PHASES)
    assert all(math.isfinite(ms) and ms > 0 for ms in onnxruntime_swiglu_ms)
    assert OnnxRuntimeBackend().prepare(workload("ffn_noop"), resolve_target("cpu"))() == [0.0, 0.0]


def test_onnxruntime_and_torch_agree_within_a_sane_factor(onnxruntime_swiglu_ms):
    with one_thread():
        torch_ms = median_ms(TorchBackend(), workload("ffn128"), rounds=20)
    for ort_ms, eager_ms in zip(onnxruntime_swiglu_ms, torch_ms):
        assert 0.1 < ort_ms / eager_ms < 10, (onnxruntime_swiglu_ms, torch_ms)


def test_onnxruntime_runs_fp32_on_the_cpu_only():
    backend, cpu = OnnxRuntimeBackend(), resolve_target("cpu")
    assert backend.available(cpu, SCENARIO) == (True, "")
    ok, reason = backend.available(resolve_target("h100"), SCENARIO)
    assert not ok and "h100-sxm" in reason and "CPUExecutionProvider" in reason
    ok, reason = backend.available(cpu, Scenario(dtype="bf16", kv_dtype="bf16"))
    assert not ok and "bf16" in reason


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_says_it_is_not_installed():
    ok, reason = TensorRTBackend().available(resolve_target("h100"), Scenario(dtype="bf16", kv_dtype="bf16"))
    assert not ok and "not installed" in reason and "hwopt[tensorrt]" in reason


def test_tensorrt_refuses_a_cpu_target():
    ok, reason = TensorRTBackend().available(resolve_target("cpu"), SCENARIO)
    assert not ok and "CPU" in reason


def test_engine_build_plan_per_tensorrt_version():
    # TensorRT 10: weakly typed, a precision flag lets the builder pick kernels in that precision
    assert engine_build_plan(10, "fp32") == BuildPlan(strongly_typed=False, precision_flags=())
    assert engine_build_plan(10, "fp16") == BuildPlan(strongly_typed=False, precision_flags=("FP16",))
    assert engine_build_plan(10, "bf16") == BuildPlan(strongly_typed=False, precision_flags=("BF16",))
    # TensorRT 11 removed the flags: the graph's own types decide
    for dtype in ("fp32", "fp16", "bf16"):
        assert engine_build_plan(11, dtype) == BuildPlan(strongly_typed=True, precision_flags=())
    with pytest.raises(HwoptError, match="quantize"):
        engine_build_plan(10, "fp8")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_export_keeps_the_scenario_dtype(tmp_path, dtype):
    """What TensorRT 11 builds in is the graph's own types, so the export must carry the scenario's dtype."""
    import onnx

    wl = workload("ffn128", dtype)
    path = export_step(build_step(wl), wl, PHASES["decode"], tmp_path / "step.onnx")
    graph = onnx.load(path).graph
    elem = {"bf16": onnx.TensorProto.BFLOAT16, "fp16": onnx.TensorProto.FLOAT16}[dtype]
    assert graph.input[0].type.tensor_type.elem_type == elem
    assert graph.output[0].type.tensor_type.elem_type == elem
    assert {init.data_type for init in graph.initializer if len(init.dims) == 2} == {elem}
