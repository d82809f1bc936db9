"""The roofline estimate: cost terms worked out by hand, the roofline, calibration, the backend."""

from __future__ import annotations

import dataclasses
import itertools
import time

import pytest
import torch

import hwopt.calibration as calibration
import hwopt.cpu_roof as cpu_roof
import hwopt.plugins
import hwopt.roofline as roofline
import hwopt.timing as timing
from hwopt.calibration import calibration_of, fit_calibration, target_toml
from hwopt.cli import main
from hwopt.cpu_roof import roof_of
from hwopt.errors import HwoptError
from hwopt.model.config import AttentionConfig, FFNConfig
from hwopt.model_source import resolve_model
from hwopt.roofline import CostTerms, Efficiency, Roof, outside_layers_terms, roofline_ms
from hwopt.search_space import Scenario, SearchSpace, sub_variant_of, sub_variants
from hwopt.targets import Target, resolve_target
from hwopt.workload import Phase, Workload, scenario_phases

# Llama-3.1-70B: hidden 8192, 64 query heads, 8 KV heads of 128, FFN 28672, vocab 128256, no biases.
LLAMA_70B = resolve_model("llama-3.1-70b").config
PREFILL_2 = Phase("prefill", batch=2, new_tokens=128, cached=0)  # 256 tokens
PREFILL_8 = Phase("prefill", batch=8, new_tokens=128, cached=0)  # 1024 tokens
DECODE_64 = Phase("decode", batch=64, new_tokens=1, cached=1000)  # 64 tokens
DECODE_1 = Phase("decode", batch=1, new_tokens=1, cached=10)  # one token: the per-call overhead shows
H100 = Roof({"bf16": 989.0}, 3350.0, "H100 datasheet")


def terms(cfg, phase: Phase) -> CostTerms:
    variant = sub_variant_of(LLAMA_70B, cfg)
    return variant.block_type.cost_terms(cfg, LLAMA_70B, phase)


def test_gqa_kv8_prefill_by_hand():
    got = terms(AttentionConfig(n_heads_in_group=8), PREFILL_2)
    q_and_o = 2 * (2 * 256 * 8192 * 8192)  # 34,359,738,368 each
    k_and_v = 2 * (2 * 256 * 8192 * 1024)  # 4,294,967,296 each
    pairs = 2 * (128 * 129 // 2)  # per head: each of 128 new tokens sees itself and those before it
    scores_and_av = 2 * (2 * 128 * 64 * pairs)  # 270,532,608 each
    assert got.flops == q_and_o + k_and_v + scores_and_av == 77_850_476_544
    assert got.weights == 2 * 8192 * 8192 + 2 * 1024 * 8192 + 8192 == 151_003_136  # Q, O, K, V, norm
    assert got.kv_read == 0  # an empty cache
    assert got.kv_written == 2 * 256 * 1024  # the new tokens' keys and values
    # norm and residual 5·t·h; Q in and out; K and V in; the attention core's Q in and output; O in and out
    assert got.activations == 5 * 256 * 8192 + 2 * 256 * 8192 + 2 * 256 * 8192 + 2 * 256 * 8192 + 2 * 256 * 8192
    assert got.activations == 27_262_976


def test_gqa_kv8_decode_by_hand():
    got = terms(AttentionConfig(n_heads_in_group=8), DECODE_64)
    assert got.flops == 2 * 64 * 8192 * (8192 + 1024 + 1024 + 8192) + 4 * 128 * 64 * (64 * 1001) == 21_426_601_984
    assert got.kv_read == 2 * 64 * 1000 * 1024 == 131_072_000  # the whole cache of 1000 tokens
    assert got.kv_written == 2 * 64 * 1024
    assert got.activations == 5 * 64 * 8192 + 4 * (2 * 64 * 8192) == 6_815_744
    assert got.bytes("bf16", "bf16") == 2 * (151_003_136 + 131_072_000 + 131_072 + 6_815_744) == 578_043_904
    assert got.bytes("bf16", "fp8") == 2 * (151_003_136 + 6_815_744) + 131_072_000 + 131_072


def test_fewer_kv_heads_read_less_cache():
    kv1, kv8 = (terms(AttentionConfig(n_heads_in_group=g), DECODE_64) for g in (64, 8))
    assert kv1.kv_read * 8 == kv8.kv_read
    assert kv1.flops < kv8.flops


def test_swiglu_28672_prefill_by_hand():
    got = terms(FFNConfig(intermediate_size=28672), PREFILL_8)
    assert got.flops == 3 * (2 * 1024 * 8192 * 28672) + 5 * 1024 * 28672 == 1_443_255_812_096
    assert got.weights == 3 * 8192 * 28672 + 8192 == 704_651_264
    assert got.kv_read == got.kv_written == 0
    # norm and residual; gate, up and down in and out; silu(gate)·up reads two and writes one
    assert got.activations == 5 * 1024 * 8192 + 3 * 1024 * (8192 + 28672) + 3 * 1024 * 28672 == 243_269_632


def test_linear_and_no_op():
    linear = terms(FFNConfig(replace_with_linear=True), DECODE_64)
    assert linear == CostTerms(flops=2 * 64 * 8192 * 8192, weights=8192 * 8192 + 8192,
                               activations=5 * 64 * 8192 + 2 * 64 * 8192)
    assert terms(AttentionConfig(no_op=True), PREFILL_2) == CostTerms()
    assert roofline_ms(CostTerms(), H100, "bf16", "bf16", Efficiency(0.5, 0.5, 0.01)) == 0.0  # nothing launched


def test_outside_layers_by_hand():
    got = outside_layers_terms(LLAMA_70B, DECODE_64)
    assert got.flops == 2 * 64 * 8192 * 128256 == 134_486_163_456  # the LM head
    assert got.weights == 64 * 8192 + 8192 + 8192 * 128256  # gathered embedding rows, final norm, LM head
    # embeddings out, cos and sin (one position), final norm in/out, LM head in/out, argmax reads the logits
    assert got.activations == 64 * 8192 + 2 * 128 + 2 * 64 * 8192 + 64 * (8192 + 128256) + 64 * 128256
    prefill = outside_layers_terms(LLAMA_70B, PREFILL_2)
    assert prefill.flops == 2 * 2 * 8192 * 128256  # the LM head sees the last position of each sequence only
    assert prefill.weights == 256 * 8192 + 8192 + 8192 * 128256


def test_roofline_compute_bound_prefill():
    ffn = terms(FFNConfig(intermediate_size=28672), PREFILL_8)
    assert roofline_ms(ffn, H100, "bf16", "bf16") == pytest.approx(1_443_255_812_096 / 989e9)  # 1.459 ms
    assert 1_895_841_792 / 3350e6 < 1_443_255_812_096 / 989e9  # its bytes would take 0.566 ms
    calibrated = Efficiency(compute=0.5, memory=0.8, overhead_ms=0.01)
    assert roofline_ms(ffn, H100, "bf16", "bf16", calibrated) == pytest.approx(1_443_255_812_096 / 989e9 / 0.5 + 0.01)


def test_roofline_memory_bound_decode():
    attention = terms(AttentionConfig(n_heads_in_group=8), DECODE_64)
    assert roofline_ms(attention, H100, "bf16", "bf16") == pytest.approx(578_043_904 / 3350e6)  # 0.173 ms
    calibrated = Efficiency(compute=0.5, memory=0.8, overhead_ms=0.01)
    assert roofline_ms(attention, H100, "bf16", "bf16", calibrated) == pytest.approx(578_043_904 / 3350e6 / 0.8 + 0.01)


# ---------------------------------------------------------------- calibration

KNOWN = Efficiency(compute=0.62, memory=0.81, overhead_ms=0.004)


def synthetic_rows(target, efficiency: Efficiency) -> list[dict]:
    """Rows as a device with these factors would time them: compute-, memory- and overhead-bound ones."""
    rows = []
    for model, kv_group, ffn in (("llama-3.1-70b", 8, 28672), ("smollm2-135m", 3, 1536)):
        blocks = {"attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": kv_group},
                  "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": ffn},
                  "outside_layers": None}
        for (kind, block), phase in itertools.product(blocks.items(), (PREFILL_8, DECODE_64, DECODE_1)):
            row = {"device": "NVIDIA H100 80GB HBM3", "backend": "synthetic", "date": "2025-06-01", "model": model,
                   "kind": kind, **({"block": block} if block else {}), "dtype": "bf16", "kv_dtype": "bf16",
                   "phase": phase.name, "batch": phase.batch, "new_tokens": phase.new_tokens, "cached": phase.cached,
                   "ms": 1.0}
            [row_terms] = roofline.workload_terms(calibration.CalibrationRow.from_dict(row).workload())
            rows.append({**row, "ms": roofline_ms(row_terms, roof_of(target), "bf16", "bf16", efficiency)})
    return rows


def test_fit_recovers_known_factors():
    h100 = resolve_target("h100")
    fit = fit_calibration(dataclasses.replace(h100, calibration=tuple(synthetic_rows(h100, KNOWN))))
    assert fit.efficiency.compute == pytest.approx(KNOWN.compute, rel=1e-3)
    assert fit.efficiency.memory == pytest.approx(KNOWN.memory, rel=1e-3)
    assert fit.efficiency.overhead_ms == pytest.approx(KNOWN.overhead_ms, rel=1e-3)
    assert max(abs(fit.errors(fit.fitted_ms))) < 1e-3
    assert min(fit.errors(fit.datasheet_ms)) < -0.2  # the datasheet roofline is optimistic
    assert "18 timings from NVIDIA H100 80GB HBM3, synthetic, 2025-06-01" in fit.report()
    assert fit_calibration(h100) is None


def test_malformed_rows_name_row_and_field():
    h100 = resolve_target("h100")
    good = synthetic_rows(h100, KNOWN)[:2]
    for bad, words in (({k: v for k, v in good[1].items() if k != "ms"}, "lacks the field 'ms'"),
                       ({**good[1], "batch": "64"}, "field 'batch' must be int"),
                       ({**good[1], "kind": "moe"}, "field 'kind' is 'moe'"),
                       ({**good[1], "ms": 0.0}, "'ms' must be positive"),
                       ({**good[1], "model": "nope"}, "unknown model 'nope'"),
                       ({**good[1], "block": {"no_op": True, "replace_with_linear": True}},
                        "field 'block': attention.no_op and attention.replace_with_linear are both true")):
        with pytest.raises(HwoptError, match=f"calibration row 2: .*{words}"):
            fit_calibration(dataclasses.replace(h100, calibration=(good[0], bad)))


def test_target_toml_round_trip(tmp_path):
    h100 = resolve_target("h100")
    rows = tuple(synthetic_rows(h100, KNOWN))
    target = dataclasses.replace(h100, description='H100 "SXM" 80GB, µ-tested', calibration=rows)
    path = tmp_path / "h100-calibrated.toml"
    path.write_text(target_toml(target, header="a test\nof the writer"))
    back = Target.from_toml(path)
    assert back.calibration == rows
    assert dataclasses.replace(back, path=None) == dataclasses.replace(target, path=None)


# ---------------------------------------------------------------- the backend


def backend():
    return hwopt.plugins.backends().get("roofline")


def test_availability_says_why_not():
    b = backend()
    assert b.measures is False
    ok, why = b.available(resolve_target("a100"), Scenario.parse("128/64", 1, "fp8"))
    assert not ok and "fp8" in why
    no_bandwidth = Target("x1", "gpu", "X1", peak_tflops={"bf16": 100.0}, dtypes=("bf16",))
    ok, why = b.available(no_bandwidth, Scenario.parse("128/64", 1, "bf16"))
    assert not ok and "bandwidth_gbs" in why
    no_fp8_peak = dataclasses.replace(no_bandwidth, bandwidth_gbs=1000.0, dtypes=("bf16", "fp8"))
    ok, why = b.available(no_fp8_peak, Scenario.parse("128/64", 1, "fp8"))
    assert not ok and "peak_tflops.fp8" in why
    assert b.available(resolve_target("h100"), Scenario.parse("128/64", 1, "fp8")) == (True, "")


def test_describe_datasheet_and_calibrated():
    h100, scenario = resolve_target("h100"), Scenario.parse("128/64", 1, "bf16")
    assert "989 TFLOP/s bf16, 3350 GB/s" in backend().describe(h100, scenario)["model"]
    calibrated = dataclasses.replace(h100, calibration=tuple(synthetic_rows(h100, KNOWN)))
    model = backend().describe(calibrated, scenario)["model"]
    assert model.startswith("roofline calibrated on 18 timings") and "e_compute=0.62" in model
    assert calibration_of(calibrated).efficiency.memory == pytest.approx(0.81, rel=1e-3)


def test_llama_70b_search_space_in_well_under_a_second():
    h100, scenario = resolve_target("h100"), Scenario.parse("128/1024", 64, "bf16")
    pieces = [v for kind in ("attention", "ffn") for v in sub_variants(LLAMA_70B, SearchSpace(), kind)] + [None]
    start = time.perf_counter()
    times = {getattr(v, "name", "outside_layers"): backend().prepare(
        Workload(v, LLAMA_70B, "bf16", "bf16", scenario_phases(scenario)), h100)() for v in pieces}
    assert time.perf_counter() - start < 0.5
    assert times["ffn28672"][0] == pytest.approx(6 * 8192 * 8192 * 28672 / 989e9, rel=1e-3)  # compute-bound
    assert times["kv1"][-1] < times["kv8"][-1]
    assert times["attn_noop"] == [0.0] * 4


# ---------------------------------------------------------------- this CPU, and hwopt calibrate


def fake_load(others: float):
    """A ``hwopt.timing.CpuLoad`` that says other processes kept ``others`` of two cores busy."""

    class FakeLoad(timing.CpuLoad):
        def __enter__(self):
            self.cores, self.others = [0, 1], others
            return self

        def __exit__(self, *exc):
            return None

    return FakeLoad


def fake_measurements(monkeypatch, tmp_path, others: float = 0.0) -> list[str]:
    """The CPU's micro-benchmarks replaced by a fixed roof, taken with ``others`` cores busy elsewhere; the
    cache in ``tmp_path``. Returns the machines measured, as they are."""
    monkeypatch.setenv("HWOPT_CACHE", str(tmp_path))
    calls = []

    def fake_measure(machine):
        calls.append(machine)
        return Roof({"fp32": 0.1, "bf16": 0.2}, 20.0, f"peaks measured on {machine}")

    monkeypatch.setattr(cpu_roof, "measure_cpu_roof", fake_measure)
    monkeypatch.setattr(timing, "CpuLoad", fake_load(others))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cpu_roof._cached_cpu_roof.cache_clear()
    return calls


def test_cpu_roof_measured_once_and_cached(tmp_path, monkeypatch):
    calls = fake_measurements(monkeypatch, tmp_path)
    cpu = resolve_target("cpu")
    assert roof_of(cpu).bandwidth_gbs == 20.0
    cpu_roof._cached_cpu_roof.cache_clear()  # a new process: the file answers
    assert roof_of(cpu).peak_tflops == {"fp32": 0.1, "bf16": 0.2}
    assert len(calls) == 1 and cpu.description in calls[0]
    assert (tmp_path / "cpu-roofs.json").is_file()
    cpu_roof._cached_cpu_roof.cache_clear()


def test_cpu_roof_measured_on_a_busy_machine_is_not_kept(tmp_path, monkeypatch, capsys):
    """Other processes held 1.5 of 2 cores while 2 threads measured: the roof is used once, labelled, and measured
    again by the next process."""
    calls = fake_measurements(monkeypatch, tmp_path, others=1.5)
    cpu = resolve_target("cpu")
    roof = roof_of(cpu)
    assert "too low; not kept" in roof.source and "1.5 of this process's 2 cores" in roof.source
    assert "warning: this CPU's peaks were measured while" in capsys.readouterr().err
    assert not (tmp_path / "cpu-roofs.json").exists()
    cpu_roof._cached_cpu_roof.cache_clear()  # a new process, on a quiet machine now: measured again, and kept
    monkeypatch.setattr(timing, "CpuLoad", fake_load(0.0))
    assert "not kept" not in roof_of(cpu).source and len(calls) == 2
    assert (tmp_path / "cpu-roofs.json").is_file()
    cpu_roof._cached_cpu_roof.cache_clear()


def test_cpu_micro_benchmarks_measure_something():
    roof = cpu_roof.measure_cpu_roof("this test's CPU")
    assert roof.bandwidth_gbs > 0.1 and all(peak > 1e-4 for peak in roof.peak_tflops.values())
    assert set(roof.peak_tflops) == {"fp32", "bf16"} and "this test's CPU" in roof.source


class FakeMeasuringBackend:
    """Times pieces as a device with the KNOWN factors would, so calibrate can be checked without waiting."""

    name = "fake"
    measures = True

    def available(self, target, scenario):
        return True, ""

    def describe(self, target, scenario):
        return {"device": "NVIDIA H100 80GB HBM3", "backend": "fake", "method": "arithmetic"}

    def prepare(self, workload, target):
        ms = [roofline_ms(t, roof_of(target), workload.dtype, workload.kv_dtype, KNOWN)
              for t in roofline.workload_terms(workload)]
        return lambda: ms


def test_calibrate_command_writes_a_target_the_roofline_uses(tmp_path, monkeypatch, capsys):
    registry = hwopt.plugins.Registry("backend", {"fake": FakeMeasuringBackend(), "roofline": backend()})
    monkeypatch.setattr(hwopt.plugins, "backends", lambda: registry)
    out = tmp_path / "my-h100.toml"
    assert main(["calibrate", "--target", "h100", "--model", "llama-3.1-70b", "--backend", "fake",
                 "--scenario", "128/1024", "--batch", "64", "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "44 timings" in report  # (4 attention + 4 FFN variants + 2 linear + the rest) x 4 phases; no no-ops
    assert "e_compute=0.62, e_memory=0.81, overhead=4 µs" in report
    target = resolve_target(str(out))
    assert len(target.calibration) == 44 and target.path == out
    assert "calibrated on 44 timings" in backend().describe(target, Scenario.parse("128/1024", 64, "bf16"))["model"]
    assert main(["calibrate", "--target", "h100", "--model", "llama-3.1-70b", "--backend", "roofline",
                 "--out", str(out)]) == 2
    assert "calibrate needs a backend that measures" in capsys.readouterr().err
