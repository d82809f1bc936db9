"""The gguf format: llama.cpp's converter found (or not), its vocabulary fix, what llama.cpp's deci refuses.

The end-to-end check (convert, run in llama-cpp-python, compare logits) runs only where ``HWOPT_LLAMA_CPP``
names a llama.cpp checkout and ``llama_cpp`` imports; ``benchmarks/gguf.py`` does it for every block kind.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from transformers import LlamaConfig

from hwopt.errors import HwoptError
from hwopt.lowering.gguf import ENV, convert_to_gguf, find_llama_cpp
from hwopt.lowering.runtimes import RUNTIMES, check_checkpoint
from hwopt.model.config import AttentionConfig as A
from hwopt.model.config import BlockConfig as B
from hwopt.model.config import FFNConfig as F
from hwopt.passes.lower import LowerOptions, lower
from hwopt.plugins import formats

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, head_dim=16, vocab_size=49152, max_position_embeddings=128,
                     tie_word_embeddings=True, rope_theta=10000.0)
PARENT = B(A(n_heads_in_group=1), F(intermediate_size=256))


def test_without_a_llama_cpp_checkout_gguf_is_unavailable_and_nothing_is_written(monkeypatch, tmp_path):
    from conftest import tiny_child

    monkeypatch.delenv(ENV, raising=False)
    ok, why = formats().get("gguf").available(None)
    assert not ok and ENV in why and "convert_hf_to_gguf.py" in why
    with pytest.raises(HwoptError, match=f"cannot lower to gguf here: set {ENV}"):
        lower(tiny_child(), None, ["gguf"], tmp_path / "out", LowerOptions(RUNTIMES["llama.cpp"]))
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv(ENV, str(tmp_path))
    assert find_llama_cpp() == (None, f"{ENV}={tmp_path} has no convert_hf_to_gguf.py or gguf-py: "
                                      "it is not a llama.cpp checkout")


def test_llama_cpp_refuses_a_linear_ffn_and_a_no_op_ffn_under_an_attention():
    blocks = [PARENT, B(A(replace_with_linear=True), F(intermediate_size=256)), B(A(no_op=True), F(no_op=True)),
              B(A(no_op=True), F(intermediate_size=256))]
    config = LlamaConfig(**{**CONFIG.to_dict(), "num_hidden_layers": 5})
    check_checkpoint(RUNTIMES["llama.cpp"], blocks, config)  # all of these run in llama.cpp's deci
    for block, message in ((B(A(n_heads_in_group=2), F(replace_with_linear=True)), "layer 4 has a linear ffn"),
                           (B(A(n_heads_in_group=2), F(no_op=True)), "layer 4 has a no-op FFN under an attention")):
        with pytest.raises(HwoptError, match=message):
            check_checkpoint(RUNTIMES["llama.cpp"], [*blocks, block], config)
        check_checkpoint(RUNTIMES["transformers"], [*blocks, block], config)
    # no-op throughout as the last layer: llama.cpp aborts (GGML_ASSERT(buffer)); elsewhere it runs
    config = LlamaConfig(**{**CONFIG.to_dict(), "num_hidden_layers": 2})
    with pytest.raises(HwoptError, match="layer 1, the last, is no-op throughout"):
        check_checkpoint(RUNTIMES["llama.cpp"], [PARENT, B(A(no_op=True), F(no_op=True))], config)
    check_checkpoint(RUNTIMES["llama.cpp"], [B(A(no_op=True), F(no_op=True)), PARENT], config)
    assert not RUNTIMES["llama.cpp"].problems([B(A(no_op=True), F(no_op=True))], config)  # one layer of a library


FAKE_CONVERTER = '''
import json, sys
from pathlib import Path

class DeciModel:
    def __init__(self, dir_model):
        self.dir_model = Path(dir_model)
        self.hparams = json.loads((self.dir_model / "config.json").read_text())
    def set_vocab(self):
        self.vocab = "llama_hf"
    def _set_vocab_gpt2(self):
        self.vocab = "gpt2"

def main():
    if "fail" in sys.argv[1]:
        raise ValueError("Can not map tensor 'model.layers.4.mlp.linear_mlp.weight'")
    model = DeciModel(sys.argv[1])
    model.set_vocab()
    Path(sys.argv[sys.argv.index("--outfile") + 1]).write_text(model.vocab + " " + sys.argv[-1])
'''


@pytest.mark.parametrize("vocab_size, tokenizer, taken", [
    (49152, {"type": "BPE", "byte_fallback": False}, "gpt2"),  # SmolLM2's: the converter alone stops here
    (32000, {"type": "BPE", "byte_fallback": True}, "llama_hf"),  # a SentencePiece-style Llama tokenizer
    (128256, {"type": "BPE", "ignore_merges": True}, "llama_hf"),  # Llama 3's: DeciModel's own GPT-2 path
])
def test_the_converter_takes_the_gpt2_vocabulary_for_a_byte_level_bpe(tmp_path, vocab_size, tokenizer, taken):
    (tmp_path / "llama.cpp" / "gguf-py").mkdir(parents=True)
    (tmp_path / "llama.cpp" / "convert_hf_to_gguf.py").write_text(textwrap.dedent(FAKE_CONVERTER))
    for name in ("child", "fail"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"architectures": ["DeciLMForCausalLM"],
                                                                "vocab_size": vocab_size}))
        (tmp_path / name / "tokenizer.json").write_text(json.dumps({"model": tokenizer}))
    out = convert_to_gguf(tmp_path / "child", tmp_path / "out" / "m.gguf", tmp_path / "llama.cpp", "fp16")
    assert out.read_text() == f"{taken} f16"
    with pytest.raises(HwoptError, match=r"convert_hf_to_gguf.py failed on (.|\n)*\nValueError: Can not map tensor"):
        convert_to_gguf(tmp_path / "fail", tmp_path / "out" / "f.gguf", tmp_path / "llama.cpp")
    with pytest.raises(HwoptError, match="--dtype fp8 is not written"):
        convert_to_gguf(tmp_path / "child", tmp_path / "out" / "m.gguf", tmp_path / "llama.cpp", "fp8")


@pytest.mark.skipif(not os.environ.get(ENV), reason=f"{ENV} names no llama.cpp checkout")
def test_llama_cpp_gives_hwopt_logits(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from hwopt.builtin.model_names import smollm2_weights
    from hwopt.model.modeling import HeteroLlamaForCausalLM
    from hwopt.plugins import block_types

    blocks = [PARENT, B(A(n_heads_in_group=2), F(intermediate_size=256)), B(A(replace_with_linear=True),
              F(intermediate_size=256)), B(A(no_op=True), F(intermediate_size=256)), B(A(no_op=True), F(no_op=True)),
              PARENT]
    torch.manual_seed(0)
    config = LlamaConfig(**{**CONFIG.to_dict(), "num_hidden_layers": len(blocks)})
    model = HeteroLlamaForCausalLM(config, blocks, block_types()).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_weights())
    lower(model, tokenizer, ["gguf"], tmp_path, LowerOptions(RUNTIMES["llama.cpp"]))
    ids = tokenizer("The capital of France is Paris, and").input_ids
    llm = llama_cpp.Llama(model_path=str(tmp_path / "gguf" / "model.fp32.gguf"), n_ctx=128, n_batch=128,
                          logits_all=True,
                          n_threads=2, verbose=False, type_k=0, type_v=0)  # an f32 KV cache
    llm.eval(ids)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    got = torch.tensor(llm.scores[:len(ids)], dtype=torch.float32)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert llm.tokenize(b"The capital of France is Paris, and", add_bos=False) == ids
