"""Every example of README's "Writing a plugin", run: registered in-process and used through hwopt's own paths."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest
import torch
from conftest import REPO
from transformers import LlamaConfig

from hwopt import plugins
from hwopt.bld import BLDSettings, Library, build_library
from hwopt.builtin.model_names import smollm2_config
from hwopt.lowering.runtimes import RUNTIMES
from hwopt.metric import Outputs
from hwopt.model.architecture import architecture_from_dict
from hwopt.model.checkpoint import nemotron_nas_config
from hwopt.model.config import parent_block_config
from hwopt.model.modeling import HeteroLlamaForCausalLM
from hwopt.passes.lower import LowerOptions, lower
from hwopt.problem import Constraint
from hwopt.profiling import choose_backend, measure_costs
from hwopt.search_space import Scenario, SearchSpace, sub_variants
from hwopt.solving import solve_library
from hwopt.targets import resolve_target


def readme_examples() -> dict[str, str]:
    """The python blocks of the section, by the name of the hook each registers through."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Writing a plugin"):text.index("## Tests")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return {re.search(r"def (hwopt_register_\w+)", b).group(1): b for b in blocks}


def example(hook: str) -> types.ModuleType:
    module = types.ModuleType(f"readme_{hook}")
    sys.modules[module.__name__] = module  # dataclasses look their module up while the class is made
    exec(compile(readme_examples()[hook], f"README.md ({hook})", "exec"), module.__dict__)
    return module


def test_the_readme_has_one_example_per_kind_of_plugin():
    assert set(readme_examples()) == set(plugins.COLLECTIONS) - {"hwopt_register_models"}


def tiny_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=128)


def test_block_type_example_is_offered_trained_written_and_read_back(tmp_path):
    module = example("hwopt_register_block_types")
    with plugins.registered(module, name="my_plugin"):
        torch.manual_seed(0)
        config = tiny_config()
        space = SearchSpace(linear=False, no_op=False, ffn_fractions=(), block_type_plugins=("my_plugin",),
                            options=(("ffn_ranks", (8,)),))
        assert [v.name for v in sub_variants(config, space, "ffn")] == ["ffn256", "ffn_rank8"]
        parent = HeteroLlamaForCausalLM(config, [parent_block_config(config)] * 2, plugins.block_types()).eval()
        ids = torch.randint(0, 101, (16, 16))
        build_library(parent, ids, space, BLDSettings(tokens=256, batch_sequences=4), tmp_path / "library")
        library = Library(tmp_path / "library", parent)
        child = library.assemble([("kv2", "ffn_rank8"), ("kv2", "ffn256")])
        bld = library.index["layers"]["layer_0"]["ffn"]["ffn_rank8"]["bld"]
        assert bld["final_nmse"] < bld["init_nmse"] < 1.0  # initialised from the parent, then distilled
        raw = json.loads(json.dumps(nemotron_nas_config(config, child.block_configs, plugins.block_types())))
        assert raw["block_configs"][0]["ffn"] == {"no_op": False, "replace_with_linear": False, "low_rank": 8}
        assert architecture_from_dict(raw, "config.json", plugins.block_types())[1] == child.block_configs
        assert child.num_parameters() == parent.num_parameters() - 3 * 64 * 256 + 2 * 64 * 8
        target, scenario = resolve_target("h100"), Scenario(dtype="bf16", kv_dtype="bf16")
        backend, label = choose_backend("roofline", target, scenario)
        variants = sub_variants(config, space, "ffn")
        costs = measure_costs(config, variants, target, scenario, backend, label, 1, "test")
        assert costs["ffn"]["ffn_rank8"]["runtime_ms"] < costs["ffn"]["ffn256"]["runtime_ms"]


def test_metric_example_scores():
    module = example("hwopt_register_metrics")
    with plugins.registered(module, name="my_plugin"):
        metric = plugins.metrics().get("top10_agreement")
        logits = torch.randn(32, 50)
        same = Outputs(logits, torch.zeros(32, 4), torch.zeros(32, dtype=torch.long))
        assert metric.compute(same, same) == 1.0 and metric.higher_is_better


def test_backend_example_prices_a_model_through_profile():
    module = example("hwopt_register_backends")
    with plugins.registered(module, name="my_plugin"):
        target, scenario = resolve_target("h100"), Scenario(dtype="bf16", kv_dtype="bf16")
        config = smollm2_config()
        variants = sub_variants(config, SearchSpace(), "attention")
        ours = measure_costs(config, variants, target, scenario, *choose_backend("cautious_roofline", target,
                                                                               scenario), 1, "test")
        plain = measure_costs(config, variants, target, scenario, *choose_backend("roofline", target, scenario),
                              1, "test")
        assert ours["attention"]["kv3"]["runtime_ms"] == pytest.approx(1.25 * plain["attention"]["kv3"]["runtime_ms"])


def test_target_example_is_a_target():
    module = example("hwopt_register_targets")
    with plugins.registered(module, name="my_plugin"):
        l40s = resolve_target("l40s")
        assert l40s.dtypes == ("fp32", "bf16", "fp16", "fp8")
        assert Scenario.for_target(l40s, "128/64", 8, "fp8").dtype == "fp8"


def test_solver_example_agrees_with_scip(tmp_path):
    module = example("hwopt_register_solvers")
    library = {f"layer_{i}": {v: {"stats": {"memory_mib": m, "runtime_ms": m / 2}, "metrics": {"kl_div": k}}
                              for v, m, k in (("big", 10.0, 0.0), ("mid", 6.0, 0.1 * (i + 1)), ("small", 2.0, 1.0))}
               for i in range(4)}
    path = tmp_path / "library.json"
    path.write_text(json.dumps(library))
    with plugins.registered(module, name="my_plugin"):
        found = {name: solve_library(path, objective="metrics.kl_div", constraints=[Constraint("stats.memory_mib",
                                                                                              max=27.0)],
                                     solver_name=name, json_path=tmp_path / f"{name}.json")
                 for name in ("exhaustive", "scip")}
    assert found["exhaustive"]["solutions"][0]["objective"] == pytest.approx(found["scip"]["solutions"][0]["objective"])


def test_output_format_example_writes_its_file(tmp_path):
    module = example("hwopt_register_formats")
    with plugins.registered(module, name="my_plugin"):
        config = tiny_config()
        model = HeteroLlamaForCausalLM(config, [parent_block_config(config)] * 2, plugins.block_types())
        lower(model, None, ["architecture-card"], tmp_path, LowerOptions(RUNTIMES["hwopt"]))
    card = json.loads((tmp_path / "architecture-card" / "architecture.json").read_text())
    assert card["num_parameters"] == model.num_parameters() and len(card["block_configs"]) == 2
