"""Plugin loading: the built-in registries, the example third-party plugin, a broken plugin."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import env_with_pythonpath

from hwopt import hookimpl, plugins
from hwopt.errors import HwoptError
from hwopt.metric import Outputs
from hwopt.model.config import AttentionConfig, FFNConfig
from hwopt.search_space import Scenario
from hwopt.targets import Target, resolve_target

EXPECTED = {
    # registry accessor -> (built-in module, {name} standing for the registered name; names that must be there; exact?)
    "block_types": ("block_types", {"gqa", "linear_attention", "no_op_attention", "swiglu", "linear_ffn",
                                    "no_op_ffn"}, True),
    "metrics": ("metrics", {"kl_div", "lm_loss", "cosine", "top1_agreement", "top5_agreement",
                            "task_accuracy"}, True),
    "backends": ("backends", {"torch", "onnxruntime", "tensorrt", "roofline"}, True),  # registered Lazy
    "targets": ("targets", {"cpu", "h100-sxm", "a100-80gb", "rtx-4090"}, False),
    "solvers": ("solvers", {"scip"}, False),
    "formats": ("formats", {"nemotron-nas"}, False),
    "models": ("model_names", {"smollm2-135m", "llama-3.1-8b", "llama-3.1-70b"}, False),
}


@pytest.mark.parametrize("accessor", sorted(EXPECTED))
def test_builtin_registries_have_their_names(accessor):
    module, names, exact = EXPECTED[accessor]
    reg = getattr(plugins, accessor)()
    builtin = {n for n, p in reg.plugin_of.items() if p == f"hwopt.builtin.{module.format(name=n)}"}
    if exact:
        assert builtin == names
    else:
        assert names <= builtin
    for name in names:
        assert reg.get(name).name == name
        assert reg.plugin_of[name] == f"hwopt.builtin.{module.format(name=name)}"


def test_listing_attributes_builtins_to_their_modules():
    listing = plugins.listing()
    for accessor, (module, names, _) in EXPECTED.items():
        kind = getattr(plugins, accessor)().kind
        for name in names:
            assert name in listing[f"hwopt.builtin.{module.format(name=name)}"][kind], (accessor, listing)
    # every built-in module is listed, even one that registered nothing new
    assert set(plugins.BUILTIN_PLUGINS) <= set(listing)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(HwoptError, match="kl_div"):
        plugins.metrics().get("no_such_metric")


def _load_js_module(site):
    """The plugin module from the temp site dir, without touching sys.path."""
    spec = importlib.util.spec_from_file_location("_hwopt_js_divergence_under_test",
                                                  site / "hwopt_js_divergence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SUBPROCESS_CODE = r"""
import json, torch
from hwopt import plugins
from hwopt.metric import Outputs
reg = plugins.metrics()
metric = reg.get("js_div")
torch.manual_seed(0)
labels = torch.randint(0, 50, (32,))
a, b = (Outputs(torch.randn(32, 50) * 3, torch.randn(32, 8), labels) for _ in range(2))
print(json.dumps({
    "plugin": reg.plugin_of["js_div"],
    "listed": plugins.listing().get("js_divergence", {}),
    "name": metric.name,
    "higher_is_better": metric.higher_is_better,
    "value": metric.compute(a, b),
    "same": metric.compute(a, a),
    "kl_div": reg.get("kl_div").compute(a, b),
}))
"""


@pytest.mark.installs_plugin
def test_example_plugin_installs_and_registers_js_div(installed_js_plugin):
    """pip-install plugins/hwopt-js-divergence and find its metric through the entry point."""
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS_CODE], capture_output=True, text=True,
                          env=env_with_pythonpath(installed_js_plugin), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["plugin"] == "js_divergence"
    assert out["listed"] == {"metric": ["js_div"]}
    assert out["name"] == "js_div" and out["higher_is_better"] is False
    assert 0 < out["value"] <= math.log(2)
    assert out["same"] == pytest.approx(0, abs=1e-6)
    assert out["kl_div"] > 0  # the built-ins are still there next to the plugin


@pytest.mark.installs_plugin
def test_js_div_properties(installed_js_plugin):
    module = _load_js_module(installed_js_plugin)
    metric = module.JensenShannonDivergence()

    def js(student_logits, teacher_logits):
        return metric.compute(*(Outputs(t, torch.zeros(len(t), 1), torch.zeros(len(t), dtype=torch.long))
                                for t in (student_logits, teacher_logits)))

    torch.manual_seed(1)
    x, y = torch.randn(16, 40), torch.randn(16, 40)
    assert js(x, x) == pytest.approx(0, abs=1e-6)
    xy, yx = js(x, y), js(y, x)
    assert xy > 0 and xy == pytest.approx(yx, rel=1e-6)
    # disjoint, near-one-hot distributions reach the ln 2 bound and do not exceed it
    hot_a, hot_b = torch.full((4, 10), -1e4), torch.full((4, 10), -1e4)
    hot_a[:, 0] = 1e4
    hot_b[:, 1] = 1e4
    far = js(hot_a, hot_b)
    assert far <= math.log(2) and far == pytest.approx(math.log(2), rel=1e-5)
    # finite for extreme logits; agrees with a direct computation on moderate ones
    p, q = torch.softmax(x, -1).double(), torch.softmax(y, -1).double()
    m = (p + q) / 2
    direct = (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).mean().item()
    assert xy == pytest.approx(direct, rel=1e-4)
    assert math.isfinite(js(x * 1e3, y * 1e3))
    # masked (-inf) logits: zero-probability tokens contribute nothing rather than NaN
    masked_x, masked_y = x.clone(), y.clone()
    masked_x[:, :5] = float("-inf")
    masked_y[:, 3:8] = float("-inf")
    value = js(masked_x, masked_y)
    assert 0 < value <= math.log(2)
    assert js(masked_x, masked_x) == pytest.approx(0, abs=1e-6)
    assert js(masked_y, masked_x) == pytest.approx(value, rel=1e-6)


BROKEN_CODE = r"""
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from hwopt import plugins
    names = plugins.metrics().names()
print(json.dumps({"warnings": [str(w.message) for w in caught], "metrics": names,
                  "plugins": sorted(plugins.listing())}))
"""


def test_broken_entry_point_plugin_only_warns(tmp_path):
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[hwopt]\nbroken = no_such_module_xyz\n")
    proc = subprocess.run([sys.executable, "-c", BROKEN_CODE], capture_output=True, text=True,
                          env=env_with_pythonpath(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    named = [w for w in out["warnings"] if "'broken'" in w]
    assert named, out["warnings"]
    assert "no_such_module_xyz" in named[0] and "failed to load" in named[0]
    assert "kl_div" in out["metrics"]
    assert "broken" not in out["plugins"]


OLD_HOOK_PLUGIN = """
import hwopt
from hwopt.targets import Target


@hwopt.hookimpl
def hwopt_register_hardware_profiles(register):
    register(Target(name="old-gpu", kind="gpu", description="an installed plugin on the old hook name",
                    peak_tflops={"bf16": 100.0}))
"""


def test_an_installed_plugin_on_a_renamed_hook_still_registers_and_is_warned(tmp_path):
    (tmp_path / "old_hook_plugin.py").write_text(OLD_HOOK_PLUGIN)
    dist = tmp_path / "old_hook_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: old-hook-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[hwopt]\nold_hook = old_hook_plugin\n")
    code = BROKEN_CODE.replace('"metrics": names', '"targets": names').replace("metrics().names()", "targets().names()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env_with_pythonpath(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "old-gpu" in out["targets"] and "h100-sxm" in out["targets"] and "old_hook" in out["plugins"]
    assert any(w.startswith("hwopt_register_hardware_profiles is deprecated") and "hwopt_register_targets" in w
               for w in out["warnings"]), out["warnings"]


class _Metric:
    def __init__(self, name):
        self.name = name
        self.higher_is_better = False

    def compute(self, student, teacher) -> float:
        return 0.0


class _MetricPlugin:
    """A plugin as an object: hook implementations are its methods."""

    def __init__(self, metric, replace=False):
        self.metric, self.replace = metric, replace

    @hookimpl
    def hwopt_register_metrics(self, register):
        register(self.metric, replace=self.replace)


def test_a_plugin_registered_in_process_is_there_for_the_block_only():
    metric = _Metric("always_zero")
    with plugins.registered(_MetricPlugin(metric), name="zero_plugin") as name:
        assert name == "zero_plugin"
        assert plugins.metrics().get("always_zero") is metric
        assert plugins.metrics().plugin_of["always_zero"] == "zero_plugin"
        assert plugins.listing()["zero_plugin"] == {"metric": ["always_zero"]}
    assert "always_zero" not in plugins.metrics().names()
    assert "zero_plugin" not in plugins.listing()


def test_a_name_registered_twice_is_an_error_naming_both_plugins_unless_replaced():
    with pytest.raises(HwoptError, match=r"^metric 'kl_div' is registered by both hwopt.builtin.metrics and "
                                         r"my_kl; .*replace=True"):
        with plugins.registered(_MetricPlugin(_Metric("kl_div")), name="my_kl"):
            pass
    assert plugins.metrics().plugin_of["kl_div"] == "hwopt.builtin.metrics"  # nothing left behind
    mine = _Metric("kl_div")
    with plugins.registered(_MetricPlugin(mine, replace=True), name="my_kl"):
        assert plugins.metrics().get("kl_div") is mine
        assert plugins.metrics().plugin_of["kl_div"] == "my_kl"
    assert plugins.metrics().get("kl_div") is not mine


def test_a_misspelt_hook_is_an_error_naming_the_plugin_and_the_hook_meant():
    class Misspelt:
        @hookimpl
        def hwopt_register_metric(self, register):
            register(_Metric("never"))

    with pytest.raises(HwoptError, match=r"^plugin 'typo' implements hwopt_register_metric, which is not a hwopt "
                                         r"hook \(did you mean hwopt_register_metrics\?\)"):
        with plugins.registered(Misspelt(), name="typo"):
            pass
    assert "typo" not in plugins.listing()


class _Format:
    def __init__(self, name):
        self.name, self.description, self.needs = name, "nothing written", "nothing"

    def lower(self, model, tokenizer, out_dir, options):
        pass


def _l40s(description="NVIDIA L40S"):
    return Target(name="l40s", kind="gpu", description=description, nvml_names=("L40S",), memory_gib=48,
                  bandwidth_gbs=864, peak_tflops={"bf16": 362, "fp8": 733})


def test_a_plugin_implementing_a_renamed_hook_still_registers_and_is_warned():
    class OldNames:  # a third-party plugin written before the hooks were renamed
        @hookimpl
        def hwopt_register_hardware_profiles(self, register):
            register(_l40s("through the old hook"))

        @hookimpl
        def hwopt_register_lowerings(self, register):
            register(_Format("card"))

    with pytest.warns(DeprecationWarning) as caught:
        with plugins.registered(OldNames(), name="old_names"):
            assert resolve_target("l40s").description == "through the old hook"
            assert plugins.targets().plugin_of["l40s"] == "old_names"
            assert plugins.formats().get("card").name == "card"
            assert plugins.listing()["old_names"] == {"target": ["l40s"], "format": ["card"]}
    messages = [str(w.message) for w in caught]
    for old, new in (("hwopt_register_hardware_profiles", "hwopt_register_targets"),
                     ("hwopt_register_lowerings", "hwopt_register_formats")):
        assert any(m.startswith(f"{old} is deprecated") and new in m for m in messages), messages
    assert "l40s" not in plugins.targets().names() and "card" not in plugins.formats().names()


def test_the_new_hook_names_register_without_a_deprecation_warning():
    class NewNames:
        @hookimpl
        def hwopt_register_targets(self, register):
            register(_l40s())

        @hookimpl
        def hwopt_register_formats(self, register):
            register(_Format("card"))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with plugins.registered(NewNames(), name="new_names"):
            assert resolve_target("l40s").description == "NVIDIA L40S"
            assert plugins.targets().plugin_of["l40s"] == "new_names"
            assert plugins.formats().plugin_of["card"] == "new_names"
    assert not [w for w in caught if "deprecated" in str(w.message)]


def test_the_old_module_and_protocol_names_still_import_with_a_warning():
    import hwopt.model_source
    import hwopt.protocols

    with pytest.warns(DeprecationWarning, match=r"hwopt.hardware.HardwareProfile is deprecated: use hwopt.targets"):
        from hwopt.hardware import HardwareProfile
    assert HardwareProfile is Target
    with pytest.warns(DeprecationWarning, match="hwopt.protocols.Lowering is deprecated: use Format"):
        assert hwopt.protocols.Lowering is hwopt.protocols.Format
    with pytest.warns(DeprecationWarning, match=r"hwopt.models is deprecated: use hwopt.model_source.ModelSpec"):
        from hwopt.models import ModelSpec
    assert ModelSpec is hwopt.model_source.ModelSpec


def test_two_block_types_claiming_one_config_is_an_error_naming_both():
    class WideSwiGLU:  # a plugin FFN family that wrongly reuses the built-in FFNConfig
        name = "wide_swiglu"
        kind = "ffn"
        keys = {"intermediate_size"}

        def variants(self, config, space):
            return []

        def matches(self, cfg):
            return isinstance(cfg, FFNConfig) and cfg.intermediate_size is not None

        def claims(self, entry):
            return entry.get("intermediate_size") is not None

    class Plugin:
        @hookimpl
        def hwopt_register_block_types(self, register):
            register(WideSwiGLU())

    with plugins.registered(Plugin(), name="wide"):
        with pytest.raises(HwoptError, match=r"block types swiglu \(hwopt.builtin.block_types\) and wide_swiglu "
                                             r"\(wide\) both claim FFNConfig"):
            plugins.block_types().of(FFNConfig(intermediate_size=256))
        with pytest.raises(HwoptError, match=r"^config.json: layer 2: the ffn entry .* is claimed by block types "
                                             r"swiglu \(hwopt.builtin.block_types\) and wide_swiglu \(wide\)"):
            plugins.block_types().from_json("ffn", {"intermediate_size": 256}, None, "config.json: layer 2")
        assert plugins.block_types().of(AttentionConfig(n_heads_in_group=1)).name == "gqa"  # the others still work


def test_a_target_built_in_python_gets_its_dtypes_from_its_peak_rates():
    l40s = _l40s()
    assert l40s.dtypes == ("bf16", "fp8")
    assert Scenario.for_target(l40s, "128/64", 1).dtype == "bf16"
    with pytest.raises(HwoptError, match=r"^l40s has no fp32 \(--dtype\); it computes in bf16, fp8$"):
        Scenario.for_target(l40s, "128/64", 1, "fp32")
