"""Plugin loading: the built-in registries, the example third-party plugin, a broken plugin."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import env_with_pythonpath

from hwopt import plugins
from hwopt.metric import Outputs

EXPECTED = {
    # registry accessor -> (built-in module, {name} standing for the registered name; names that must be there; exact?)
    "block_types": ("block_types", {"gqa", "linear_attention", "no_op_attention", "swiglu", "linear_ffn",
                                    "no_op_ffn"}, True),
    "metrics": ("metrics", {"kl_div", "lm_loss", "cosine", "top1_agreement", "top5_agreement",
                            "task_accuracy"}, True),
    "backends": ("backend_{name}", {"torch", "onnxruntime", "tensorrt", "roofline"}, True),
    "hardware_profiles": ("hardware_profiles", {"cpu", "h100-sxm", "a100-80gb", "rtx-4090"}, False),
    "solvers": ("solvers", {"scip"}, False),
    "lowerings": ("lowerings", {"nemotron-nas"}, False),
    "models": ("models", {"smollm2-135m", "llama-3.1-8b", "llama-3.1-70b"}, False),
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
    from hwopt.errors import HwoptError

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
