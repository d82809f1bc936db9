"""Configs and checkpoints other tools wrote: read right, or refused in one line naming file, layer and key."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import hwopt_cli
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from hwopt import load_model
from hwopt.builtin.block_types import ffn_width
from hwopt.errors import HwoptError
from hwopt.lowering.runtimes import RUNTIMES
from hwopt.model.architecture import read_architecture
from hwopt.model.checkpoint import weight_files
from hwopt.model.config import AttentionConfig, BlockConfig, FFNConfig, rebuilt_by_ffn_mult
from hwopt.model.modeling import HeteroLlamaForCausalLM
from hwopt.model_source import resolve_model
from hwopt.passes.lower import LowerOptions, lower
from hwopt.plugins import block_types
from hwopt.search_space import Scenario, SearchSpace, sub_variants
from hwopt.targets import resolve_target

CASES = Path(__file__).parent / "data" / "real_world"


def total_params(path: Path) -> int:
    from hwopt.estimate import estimate

    result = estimate(resolve_model(str(path)), resolve_target("h100"), Scenario(dtype="bf16", kv_dtype="bf16"))
    return result["total"]["num_params"]


def test_puzzletron_child_is_read_as_the_child_not_its_parent():
    path = CASES / "puzzletron-child-llama8b.config.json"
    config, blocks = read_architecture(path, block_types())
    assert total_params(path) == 6_285_398_016
    assert config.intermediate_size == 14336 and config.num_key_value_heads == 8  # the parent's, kept
    assert [b.ffn.intermediate_size for b in blocks] == [14336] * 16 + [7168] * 16
    assert [b.attention.no_op for b in blocks] == [False] * 24 + [True] * 8
    assert {b.attention.n_heads_in_group for b in blocks[:24]} == {4}


def test_puzzletron_blocks_read_under_the_nemotron_nas_model_type_too(tmp_path):
    raw = json.loads((CASES / "puzzletron-child-llama8b.config.json").read_text())
    raw["model_type"] = "nemotron-nas"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert total_params(tmp_path / "config.json") == 6_285_398_016


def test_deci_model_type_is_nemotron_nas():
    assert total_params(CASES / "deci-model-type.config.json") == 416_860_160


@pytest.mark.parametrize("name, key", [("group5-of-16", "n_heads_in_group = 5 does not divide"),
                                       ("group32-of-16", "n_heads_in_group = 32 is more than the 16 attention heads")])
def test_bad_kv_grouping_from_the_field(name, key):
    path = CASES / f"{name}.config.json"
    with pytest.raises(HwoptError) as err:
        read_architecture(path, block_types())
    assert str(err.value).startswith(f"{path}: layer 0: attention.{key}")


# ------------------------------------------------------------------ every field checked, one line each

def nemotron_dict() -> dict:
    """A valid 3-layer nemotron-nas config: 16 heads, hidden 256."""
    sized = {"attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 4},
             "ffn": {"no_op": False, "replace_with_linear": False, "ffn_mult": 2.0, "intermediate_size": 512}}
    linear = {"attention": {"no_op": False, "replace_with_linear": True, "n_heads_in_group": None},
              "ffn": {"no_op": True, "replace_with_linear": False, "ffn_mult": None}}
    return {"model_type": "nemotron-nas", "architectures": ["DeciLMForCausalLM"], "hidden_size": 256,
            "num_attention_heads": 16, "num_hidden_layers": 3, "vocab_size": 512, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 256, "intermediate_size": None,
            "num_key_value_heads": None, "tie_word_embeddings": False,
            "block_configs": [copy.deepcopy(sized), linear, copy.deepcopy(sized)]}


def set_path(raw: dict, path: str, value):
    *parents, last = path.split(".")
    node = raw
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value


BLOCK_FAULTS = [
    ("attention.n_heads_in_group", 5, "attention.n_heads_in_group = 5 does not divide the 16 attention heads"),
    ("attention.n_heads_in_group", 32, "attention.n_heads_in_group = 32 is more than the 16 attention heads"),
    ("attention.n_heads_in_group", 0, "attention.n_heads_in_group = 0 must be a positive integer"),
    ("attention.n_heads_in_group", "4", "attention.n_heads_in_group = '4' must be a positive integer"),
    ("attention.n_heads_in_group", None, "attention.n_heads_in_group is missing"),
    ("attention.num_key_value_heads", 3, "attention.num_key_value_heads = 3 does not divide the 16 attention heads"),
    ("attention.num_key_value_heads", 2, "attention.n_heads_in_group = 4 disagrees with num_key_value_heads = 2"),
    ("attention.no_op", True, "attention.no_op and attention.replace_with_linear are both true"),
    ("attention.no_op", "false", "attention.no_op = 'false' must be true or false"),
    ("attention.window_length", 64, "attention.window_length = 64: sliding-window attention needs"),
    ("ffn.intermediate_size", -512, "ffn.intermediate_size = -512 must be a positive integer"),
    ("ffn.intermediate_size", 0, "ffn.intermediate_size = 0 must be a positive integer"),
    ("ffn.intermediate_size", 511.5, "ffn.intermediate_size = 511.5 must be a positive integer"),
    ("ffn.ffn_mult", -1.0, "ffn.ffn_mult = -1.0 must be a positive number"),
    ("ffn.no_op", True, "ffn.no_op and ffn.replace_with_linear are both true"),
    ("ffn.moe", {"num_local_experts": 8}, "ffn.moe = {'num_local_experts': 8}: mixture-of-experts"),
    ("ffn", KeyError, "ffn is missing"),
]


@pytest.mark.parametrize("key, value, message", BLOCK_FAULTS, ids=[f"{k}={v}" for k, v, _ in BLOCK_FAULTS])
def test_each_invalid_block_field_is_one_line_naming_file_layer_and_key(tmp_path, key, value, message):
    raw = nemotron_dict()
    if key == "ffn.no_op":
        raw["block_configs"][2]["ffn"]["replace_with_linear"] = True
    if key == "attention.no_op":
        raw["block_configs"][2]["attention"]["replace_with_linear"] = True
    if key == "ffn.intermediate_size" or key == "ffn.ffn_mult":
        raw["block_configs"][2]["ffn"]["intermediate_size" if key == "ffn.ffn_mult" else "ffn_mult"] = None
    set_path(raw, f"block_configs.2.{key}", value)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(HwoptError) as err:
        read_architecture(tmp_path, block_types())
    assert str(err.value).startswith(f"{path}: layer 2: {message}"), str(err.value)
    assert "\n" not in str(err.value)


TOP_FAULTS = [
    ("vocab_size", "49152", "vocab_size = '49152' must be a positive integer"),
    ("hidden_size", 250, "hidden_size = 250 is not a multiple of num_attention_heads = 16"),
    ("num_hidden_layers", KeyError, "num_hidden_layers is missing"),
    ("rms_norm_eps", "tiny", "rms_norm_eps = 'tiny' must be a positive number"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings = 'yes' must be true or false"),
    ("block_configs", None, "block_configs must be a list"),
    # what transformers' LlamaConfig refused (or let through to a traceback), now refused by hwopt's reader
    ("hidden_act", 3, "hidden_act = 3 must be a string"),
    ("attention_bias", "no", "attention_bias = 'no' must be true or false"),
    ("eos_token_id", "x", "eos_token_id = 'x' must be a token id (an integer) or a list of them"),
    ("initializer_range", 5, "initializer_range = 5 must be a number from 0 to 1"),
    ("torch_dtype", "nope", "torch_dtype = 'nope' must be one of float32"),
    ("rope_scaling", "abc", "rope_scaling = 'abc' must be a JSON object or null"),
    ("rope_scaling", {"rope_type": "llama3"}, "rope_scaling of rope_type 'llama3' is missing factor, low_freq_factor"),
    ("rope_scaling", {"rope_type": "nope"}, "rope_scaling has rope_type 'nope'; a Llama takes one of default"),
    ("rope_scaling", {"rope_type": "linear", "factor": 0.5}, "rope_scaling.factor = 0.5 must be at least 1"),
    ("model_type", "mistral", None),  # architectures still say DeciLM: read as nemotron-nas
]


@pytest.mark.parametrize("key, value, message", TOP_FAULTS, ids=[f"{k}={v}" for k, v, _ in TOP_FAULTS])
def test_each_invalid_top_level_field_is_one_line_naming_file_and_key(tmp_path, key, value, message):
    raw = nemotron_dict()
    set_path(raw, key, value)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    if message is None:
        assert len(read_architecture(path, block_types())[1]) == 3
        return
    with pytest.raises(HwoptError) as err:
        read_architecture(path, block_types())
    assert str(err.value) .startswith(f"{path}: {message}"), str(err.value)


LIGHT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "attention_bias", "mlp_bias")


@pytest.mark.parametrize("model", ["puzzletron-child-llama8b", "deci-model-type", "smollm2-135m", "llama-3.1-70b"])
def test_the_config_read_without_transformers_is_the_one_transformers_makes(model):
    path = CASES / f"{model}.config.json"
    config = resolve_model(str(path) if path.is_file() else model).architecture
    llama = config.transformers()
    assert {key: getattr(config, key) for key in LIGHT_FIELDS} == {key: getattr(llama, key) for key in LIGHT_FIELDS}
    rope = dict(llama.rope_parameters)
    assert config.rope_theta == rope.pop("rope_theta")
    assert config.rope_scaling == (rope if rope["rope_type"] != "default" else None)


def test_estimate_and_load_model_give_the_same_line_for_a_field_transformers_checks(tmp_path):
    raw = {**json.loads((CASES / "deci-model-type.config.json").read_text()), "rope_scaling": {"rope_type": "llama3"}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(HwoptError) as err:
        load_model(str(tmp_path))
    assert "rope_scaling of rope_type 'llama3' is missing factor" in str(err.value)
    proc = hwopt_cli("estimate", "--target", "h100", "--model", tmp_path)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [f"hwopt: error: {err.value}"], proc.stderr


def test_a_llama_config_with_kv_heads_that_do_not_divide_the_heads(tmp_path):
    raw = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                      num_hidden_layers=2, vocab_size=97).to_dict()
    raw["num_key_value_heads"] = 3
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(HwoptError, match=r"config.json: num_key_value_heads = 3 does not divide"):
        read_architecture(tmp_path, block_types())


def test_neutral_foreign_keys_are_accepted_and_unknown_ones_are_named(tmp_path):
    raw = nemotron_dict()
    raw["block_configs"][0]["attention"].update({"window_length": None, "num_sink_tokens": None, "sparsify": None,
                                                 "unshifted_sink": False, "weights_precision": "bf16"})
    raw["block_configs"][0]["ffn"]["sparsify"] = None
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_architecture(path, block_types())
    raw["block_configs"][1]["ffn"]["frobnicate"] = 3
    path.write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match=r"layer 1: ffn.frobnicate = 3 is not a key hwopt knows"):
        read_architecture(path, block_types())


def test_every_entry_point_gives_the_same_error_line(tmp_path):
    bad = CASES / "group5-of-16.config.json"
    model_dir = tmp_path / "bad-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_bytes(bad.read_bytes())
    with pytest.raises(HwoptError) as err:
        load_model(str(model_dir))
    expected = f"hwopt: error: {err.value}"
    assert "layer 0: attention.n_heads_in_group = 5" in expected
    for args in (["estimate", "--target", "h100", "--model", model_dir],
                 ["profile", "--model", model_dir, "--workdir", tmp_path / "p"],
                 ["optimize", "--model", model_dir, "--workdir", tmp_path / "o"]):
        proc = hwopt_cli(*args)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert lines == [expected], (args, proc.stderr[-2000:])


# ------------------------------------------------------------------ weights: follow the index

def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_sharded_checkpoint_follows_its_index_and_ignores_a_stale_file(tmp_path):
    model, stale = tiny_llama(0), tiny_llama(1)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    save_file({k: v.contiguous() for k, v in stale.state_dict().items()}, tmp_path / "model.safetensors")
    ids = torch.randint(0, 97, (2, 7))
    with pytest.warns(UserWarning, match="model.safetensors is not in model.safetensors.index.json"):
        loaded = load_model(str(tmp_path))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_an_index_naming_a_missing_shard_is_an_error(tmp_path):
    tiny_llama(0).save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-0000*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(HwoptError, match=f"names {shard.name}, which is not in"):
        load_model(str(tmp_path))


def test_a_tensor_in_two_files_is_an_error(tmp_path):
    model = tiny_llama(0)
    model.save_pretrained(tmp_path)
    save_file({"model.norm.weight": torch.ones(64)}, tmp_path / "extra.safetensors")
    with pytest.raises(HwoptError, match="tensor model.norm.weight is in both"):
        weight_files(tmp_path)


def test_an_index_that_misplaces_a_tensor_is_an_error(tmp_path):
    tiny_llama(0).save_pretrained(tmp_path, max_shard_size="100KB")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name, file = next(iter(index["weight_map"].items()))
    other = next(f for f in index["weight_map"].values() if f != file)
    index["weight_map"][name] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(HwoptError, match=f"places {name} in {other}, but that file does not hold it"):
        weight_files(tmp_path)


def test_a_puzzletron_child_checkpoint_loads_with_its_blocks(tmp_path):
    """Llama tensor names, no attention weights in no-op layers, block_configs in puzzletron's spelling."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, tie_word_embeddings=False)
    blocks = [BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(intermediate_size=512)),
              BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(intermediate_size=256)),
              BlockConfig(AttentionConfig(no_op=True), FFNConfig(intermediate_size=256))]
    child = HeteroLlamaForCausalLM(config, blocks, block_types()).eval()
    save_file({k: v.contiguous() for k, v in child.state_dict().items()}, tmp_path / "model.safetensors")
    puzzletron_blocks = [
        {"attention": {"no_op": b.attention.no_op, "replace_with_linear": False, "sparsify": None,
                       "num_key_value_heads": None if b.attention.no_op else 4 // b.attention.n_heads_in_group,
                       "llama4": None, "mamba": None, "weights_precision": "bf16"},
         "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": b.ffn.intermediate_size,
                 "moe": None, "sparsify": None}, "parallel_blocks": None} for b in blocks]
    raw = {**config.to_dict(), "model_type": "llama", "architectures": ["AnyModel"],
           "base_architecture": "LlamaForCausalLM", "block_configs": puzzletron_blocks}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = load_model(str(tmp_path))
    assert loaded.block_configs == blocks
    ids = torch.randint(0, 97, (2, 5))
    assert torch.equal(logits(loaded, ids), logits(child, ids))


# ------------------------------------------------------------------ widths readers rebuild from ffn_mult

@pytest.mark.parametrize("hidden, parent", [(576, 1536), (4096, 14336), (8192, 28672), (3200, 8640), (2048, 5632),
                                            (64, 1024), (64, 256)])
def test_every_width_the_search_space_offers_is_rebuilt_exactly_from_ffn_mult(hidden, parent):
    config = LlamaConfig(hidden_size=hidden, intermediate_size=parent, num_attention_heads=8, num_key_value_heads=8,
                         num_hidden_layers=1, vocab_size=32)
    space = SearchSpace(ffn_fractions=(0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.25, 0.1))
    widths = [v.config.intermediate_size for v in sub_variants(config, space, "ffn") if v.config.intermediate_size]
    for width in widths:
        if width != parent:
            assert rebuilt_by_ffn_mult(width, hidden) == width, (hidden, width)
            written = BlockConfig(AttentionConfig(n_heads_in_group=1), FFNConfig(intermediate_size=width))
            ffn_mult = written.to_json(block_types(), config)["ffn"]["ffn_mult"]
            assert FFNConfig.from_json({"ffn_mult": ffn_mult}, hidden).intermediate_size == width
    assert ffn_width(8640, 0.5) == 4352  # open_llama_3b: its half, on the grid


def lower_for(runtime: str, model, out):
    lower(model, None, ["nemotron-nas"], out, LowerOptions(RUNTIMES[runtime]))


def test_lower_refuses_an_off_grid_child_width_and_warns_for_an_off_grid_parent(tmp_path):
    config = LlamaConfig(hidden_size=64, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97)
    parent_block = BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(intermediate_size=320))
    off_grid = HeteroLlamaForCausalLM(config, [parent_block, BlockConfig(AttentionConfig(n_heads_in_group=2),
                                                                         FFNConfig(intermediate_size=96))],
                                      block_types())
    for runtime in ("vllm", "tensorrt-llm", "llama.cpp"):
        with pytest.raises(HwoptError, match=f"layer 1's FFN width 96 is rebuilt as 256 from its ffn_mult by {runtime}"
                           ):
            lower_for(runtime, off_grid, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    lower_for("transformers", off_grid, tmp_path / "transformers")  # reads intermediate_size: no refusal
    parent_only = HeteroLlamaForCausalLM(config, [parent_block, BlockConfig(AttentionConfig(n_heads_in_group=2),
                                                                            FFNConfig(intermediate_size=256))],
                                         block_types())
    off_grid_parent = r"parent's FFN width 320 \(layers \[0\]\) is off the ffn_mult grid: vllm, sglang"
    with pytest.warns(UserWarning, match=off_grid_parent):
        lower_for("tensorrt-llm", parent_only, tmp_path / "warned")
    assert load_model(str(tmp_path / "warned" / "nemotron-nas")).block_configs == parent_only.block_configs
