"""Lowering: the nemotron-nas checkpoint that transformers loads, and the runtime check."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import CHILD_BLOCKS as BLOCKS
from conftest import tiny_child
from transformers import AutoModelForCausalLM, LlamaConfig

from hwopt.errors import HwoptError
from hwopt.lowering.runtimes import RUNTIMES, check_checkpoint, runnable_library
from hwopt.model.checkpoint import load_checkpoint
from hwopt.model.config import AttentionConfig, BlockConfig, FFNConfig
from hwopt.passes.lower import LowerOptions, lower
from hwopt.plugins import block_types
from hwopt.search_space import Scenario


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    model = tiny_child()
    out = tmp_path_factory.mktemp("lowered")
    lower(model, None, ["nemotron-nas"], out, LowerOptions(RUNTIMES["transformers"]))
    return model, out / "nemotron-nas"


# Runs in a fresh Python that never imports hwopt: what a user of the checkpoint alone has.
REMOTE_CODE_USER = """
import sys, torch
from transformers import AutoModelForCausalLM
directory, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
ids = torch.load(out)["ids"]
with torch.no_grad():
    logits = model(ids).logits
tokens = model.generate(ids[:1, :7], max_new_tokens=10, do_sample=False)
assert "hwopt" not in sys.modules and type(model).__module__.startswith("transformers_modules"), type(model).__module__
torch.save({"logits": logits, "tokens": tokens}, out)
"""


def test_transformers_alone_loads_the_checkpoint_and_generates_as_hwopt_does(lowered, tmp_path):
    model, directory = lowered
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nemotron_nas.DeciLMForCausalLM"
    ids = torch.randint(0, 211, (2, 13))
    torch.save({"ids": ids}, tmp_path / "io.pt")
    proc = subprocess.run([sys.executable, "-c", REMOTE_CODE_USER, str(directory), str(tmp_path / "io.pt")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "io.pt")
    with torch.no_grad():
        torch.testing.assert_close(theirs["logits"], model(ids).logits, atol=1e-5, rtol=0)
    ours = model.generate(ids[:1, :7], max_new_tokens=10, do_sample=False)
    assert ours.shape == (1, 17) and torch.equal(ours, theirs["tokens"])
    with torch.no_grad():  # and both equal a loop without any cache: the cache changes nothing
        loop = ids[:1, :7]
        for _ in range(10):
            loop = torch.cat([loop, model(loop).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(loop, ours)


def test_generate_pads_prompts_on_the_left_and_samples(lowered):
    model, _ = lowered
    a, b = torch.randint(0, 211, (1, 6)), torch.randint(0, 211, (1, 3))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    together = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone = model.generate(b, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(together[1, -5:], alone[0, -5:])
    torch.manual_seed(1)
    sampled = model.generate(a, max_new_tokens=5, do_sample=True, temperature=1.5, top_k=50)
    assert sampled.shape == (1, 11) and torch.equal(sampled[:, :6], a)


# Runs in a fresh Python: plain transformers calls, no remote code, after hwopt registered its classes.
REGISTERED_USER = """
import sys, torch
import hwopt
from transformers import AutoModelForCausalLM
hwopt.register_with_transformers()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
assert type(model).__module__ == "hwopt.model.modeling_nemotron_nas", type(model).__module__
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])["ids"]).logits, sys.argv[2])
"""


def test_plain_transformers_loads_the_child_after_hwopt_registers_it(lowered, tmp_path):
    model, directory = lowered
    ids = torch.randint(0, 211, (1, 9))
    torch.save({"ids": ids}, tmp_path / "io.pt")
    proc = subprocess.run([sys.executable, "-c", REGISTERED_USER, str(directory), str(tmp_path / "io.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "io.pt"), model(ids).logits, atol=1e-5, rtol=0)


def test_bf16_weights_sharded_with_an_index(tmp_path):
    model = tiny_child(tie=False)
    options = LowerOptions(RUNTIMES["hwopt"], scenario=Scenario(dtype="bf16"))
    from hwopt.model.checkpoint import save_nemotron_nas

    save_nemotron_nas(model, tmp_path, dtype=torch.bfloat16, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert hf.dtype == torch.bfloat16
    lower(model, None, ["nemotron-nas"], tmp_path / "lower", options)
    assert json.loads((tmp_path / "lower/nemotron-nas/config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = load_checkpoint(tmp_path / "lower/nemotron-nas", block_types())
    expected = model.model.layers[1].mlp.up_proj.weight.to(torch.bfloat16).float()
    assert torch.equal(reloaded.model.layers[1].mlp.up_proj.weight, expected)


@pytest.mark.parametrize("tie", [True, False])
def test_a_checkpoint_read_a_piece_at_a_time_is_written_as_the_whole_model_would_be(tmp_path, tie):
    """nemotron-nas streams: lowered from the child read a piece at a time (as the lower pass does), it has the
    same files, index and tensors as written from the whole model, and is read back as the same model."""
    from safetensors.torch import load_file

    from hwopt.model.checkpoint import save_nemotron_nas
    from hwopt.model.layerwise import LayerwiseParent

    model = tiny_child(tie=tie)
    save_nemotron_nas(model, tmp_path / "child")  # as uptrain saves it: fp32
    options = LowerOptions(RUNTIMES["hwopt"], scenario=Scenario(dtype="bf16"))
    streamed = LayerwiseParent(tmp_path / "child", block_types())
    for name, source in (("whole", model), ("streamed", streamed)):
        save_nemotron_nas(source, tmp_path / name, dtype=torch.bfloat16, max_shard_size="40KB")
    lower(streamed, None, ["nemotron-nas"], tmp_path / "lower", options)
    whole, written = tmp_path / "whole", tmp_path / "streamed"
    assert sorted(p.name for p in whole.iterdir()) == sorted(p.name for p in written.iterdir())
    index = json.loads((whole / "model.safetensors.index.json").read_text())
    assert json.loads((written / "model.safetensors.index.json").read_text()) == index
    assert len(set(index["weight_map"].values())) > 1  # sharded, each shard written once complete
    for shard in set(index["weight_map"].values()):
        expected, got = load_file(whole / shard), load_file(written / shard)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    lowered = json.loads((tmp_path / "lower/nemotron-nas/config.json").read_text())
    assert lowered.pop("auto_map") and lowered == json.loads((whole / "config.json").read_text())  # + remote code
    reloaded = load_checkpoint(tmp_path / "lower/nemotron-nas", block_types())
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, load_checkpoint(whole, block_types())(ids).logits)


def test_lower_refuses_what_the_runtime_would_misread(tmp_path):
    model = tiny_child()
    for runtime in ("vllm", "sglang"):
        with pytest.raises(HwoptError, match=f"{runtime} would misread.*layer 0 has a linear attention"):
            lower(model, None, ["nemotron-nas"], tmp_path, LowerOptions(RUNTIMES[runtime]))
    assert not any(tmp_path.iterdir())  # refused before anything was written
    # TensorRT-LLM runs linear blocks, but rebuilds width 128 from its ffn_mult (3.0) as 256: off the grid
    with pytest.raises(HwoptError, match="layer 2's FFN width 128 is rebuilt as 256") as refused:
        check_checkpoint(RUNTIMES["tensorrt-llm"], BLOCKS, model.config)
    assert "linear" not in str(refused.value)


def test_a_width_off_the_ffn_mult_grid_is_refused_by_readers_of_ffn_mult_only():
    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    # 1536 is on the grid (ffn_mult 4.0), 1000 is not
    blocks = [BlockConfig(AttentionConfig(n_heads_in_group=3), FFNConfig(intermediate_size=w)) for w in (1536, 1000)]
    with pytest.raises(HwoptError, match="layer 1's FFN width 1000 is rebuilt as 1024"):
        check_checkpoint(RUNTIMES["tensorrt-llm"], blocks, smollm2)
    check_checkpoint(RUNTIMES["transformers"], blocks, smollm2)  # reads intermediate_size itself


def test_runnable_library_drops_linear_variants_for_vllm():
    def entry(block):
        return {"block_config": block.to_json(block_types(), tiny_child().config)}

    library = {"layer_0": {"kv2+ffn256": entry(BLOCKS[1]), "attn_linear+ffn_linear": entry(BLOCKS[0]),
                           "attn_noop+ffn_noop": entry(BLOCKS[3])}}
    config = tiny_child().config
    assert list(runnable_library(library, RUNTIMES["vllm"], config)["layer_0"]) == ["kv2+ffn256", "attn_noop+ffn_noop"]
    # llama.cpp runs linear attention but no linear FFN (tests/test_gguf.py)
    assert list(runnable_library(library, RUNTIMES["llama.cpp"], config)["layer_0"]) == ["kv2+ffn256",
                                                                                       "attn_noop+ffn_noop"]
    assert len(runnable_library(library, RUNTIMES["tensorrt-llm"], config)["layer_0"]) == 3
