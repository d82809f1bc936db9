"""The baselines of benchmarks/baselines.py: layer dropping by block influence, uniform width pruning."""

from __future__ import annotations

import pytest
import torch

from hwopt.baselines import block_influence, layer_drop, predicted_runtime_ms, uniform_width
from hwopt.errors import HwoptError
from hwopt.model.config import AttentionConfig, BlockConfig, FFNConfig
from hwopt.model.modeling import HeteroLlamaForCausalLM
from hwopt.model_source import resolve_model


def costs(attention: dict[str, float], ffn: dict[str, float], outside: float = 2.0) -> dict:
    """A profile whose variants cost ``runtime_ms``, with parameters proportional to it."""
    entry = lambda ms: {"runtime_ms": ms, "num_params": int(ms * 1000)}  # noqa: E731
    return {"attention": {k: entry(v) for k, v in attention.items()},
            "ffn": {k: entry(v) for k, v in ffn.items()}, "outside_layers": {"runtime_ms": outside}}


def test_layer_drop_removes_exactly_the_lowest_influence_layers():
    c = costs({"kv4": 1.0, "attn_noop": 0.0}, {"ffn512": 2.0, "ffn_noop": 0.0})
    parent = [("kv4", "ffn512")] * 6  # 2 + 6 * 3 = 20 ms
    influence = [0.5, 0.1, 0.9, 0.05, 0.3, 0.2]
    choice, dropped = layer_drop(parent, influence, c, budget_ms=20 / 1.5)  # 13.3 ms: 3 layers must go
    assert dropped == [3, 1, 5]
    assert [i for i, block in enumerate(choice) if block == ("attn_noop", "ffn_noop")] == [1, 3, 5]
    assert predicted_runtime_ms(c, choice) == 11.0
    assert layer_drop(parent, influence, c, budget_ms=20)[1] == []  # the parent already meets it
    # another budget (solve's --params, say) that three removed layers do not meet: a fourth goes
    few_params = lambda choice: sum(c["ffn"][f]["num_params"] for _, f in choice) <= 4000  # noqa: E731
    assert layer_drop(parent, influence, c, budget_ms=20 / 1.5, fits=few_params)[1] == [3, 1, 5, 4]
    with pytest.raises(HwoptError, match="cannot reach"):
        layer_drop(parent, influence, c, budget_ms=1.0)


def test_uniform_width_gives_the_widest_width_within_budget():
    c = costs({"kv4": 1.0, "kv2": 0.8, "kv1": 0.7, "attn_linear": 0.1, "attn_noop": 0.0},
              {"ffn512": 2.0, "ffn256": 1.0, "ffn_linear": 0.1, "ffn_noop": 0.0})
    assert uniform_width(c, 4, budget_ms=2 + 4 * 3.0) == [("kv4", "ffn512")] * 4
    assert uniform_width(c, 4, budget_ms=2 + 4 * 2.05) == [("kv4", "ffn256")] * 4  # kv1+ffn512 (2.7) is too slow
    assert uniform_width(c, 4, budget_ms=2 + 4 * 1.75) == [("kv1", "ffn256")] * 4
    with pytest.raises(HwoptError, match="no uniform width"):
        uniform_width(c, 4, budget_ms=2 + 4 * 1.0)  # only linear or removed blocks would do


def test_block_influence_is_zero_for_a_removed_layer(tiny_llama_dir):
    parent = resolve_model(str(tiny_llama_dir)).load()
    blocks = list(parent.block_configs)
    blocks[2] = BlockConfig(AttentionConfig(no_op=True), FFNConfig(no_op=True))
    model = HeteroLlamaForCausalLM(parent.config, blocks, parent.block_types)
    state = parent.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    influence = block_influence(model, torch.randint(0, 1000, (2, 16)))
    assert len(influence) == 4 and influence[2] == pytest.approx(0, abs=1e-6)
    assert all(b > 1e-4 for i, b in enumerate(influence) if i != 2)
