"""The torch modules that the measuring backends run for a ``hwopt.workload.Workload``.

The piece is a ``torch.nn.Module`` whose inputs and outputs are plain
tensors (``build_step`` and ``step_inputs``), so the same module is timed by
torch and exported to ONNX:

* a sub-block step is ``x + sub_block(norm(x))``, with the rotary ``cos``
  and ``sin`` as inputs for attention (the model computes them once per
  forward, outside the layers) and, for a sub-block that caches (its block
  type's ``kv_cache``), the cached keys and values in and the new cache out;
* the outside step is what a generation step does besides the layers:
  embed the tokens, make the rotary tables, normalise the last position,
  the LM head, and pick the next token.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from hwopt.errors import HwoptError
from hwopt.model.architecture import transformers_config
from hwopt.model.modeling import KVCache
from hwopt.workload import Phase, Workload

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "fp8": torch.float8_e4m3fn}


class SubBlockStep(nn.Module):
    """``x + sub_block(norm(x))`` with plain tensors in and out (a sub-block that caches passes its cache through)."""

    def __init__(self, workload: Workload, block: nn.Module):
        super().__init__()
        config = workload.config
        self.caches_kv = workload.kv_cache.elements_per_token > 0
        self.block = block
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos=None, sin=None, past_keys=None, past_values=None):
        positions = None if cos is None else (cos, sin)
        if not self.caches_kv:
            return x + self.block(self.norm(x), positions, None, 0)
        cache = KVCache(1)
        if past_keys is not None:
            cache.keys[0], cache.values[0], cache.length = past_keys, past_values, past_keys.shape[2]
        y = x + self.block(self.norm(x), positions, cache, 0)
        return y, cache.keys[0], cache.values[0]


class OutsideLayersStep(nn.Module):
    """A generation step without its layers: embed, rotary tables, final norm, LM head, next token."""

    def __init__(self, workload: Workload):
        super().__init__()
        config = workload.config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = LlamaRotaryEmbedding(transformers_config(config))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids, positions):
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(x, positions)
        logits = self.lm_head(self.norm(x[:, -1:]))
        return logits.argmax(-1), cos, sin


def build_step(workload: Workload, device="cpu") -> nn.Module | None:
    """The module a backend runs for ``workload``, in its dtype; None for a sub-block that computes nothing.

    Parameters are made on ``device`` directly: a 70B-sized block is slow to
    initialise on a CPU and then copy.
    """
    with torch.device(device):
        if workload.variant is None:
            module = OutsideLayersStep(workload)
        else:
            block = workload.variant.block_type.build(workload.variant.config, workload.config)
            if block is None:
                return None
            module = SubBlockStep(workload, block)
    return module.to(TORCH_DTYPES[workload.dtype]).eval()


def step_inputs(workload: Workload, phase: Phase, device="cpu", generator: torch.Generator | None = None) -> tuple:
    """Random inputs of the right shapes for one phase (timing does not depend on their values)."""
    config, dtype = workload.config, TORCH_DTYPES[workload.dtype]
    positions = torch.arange(phase.cached, phase.cached + phase.new_tokens, device=device).unsqueeze(0)
    if workload.variant is None:
        ids = torch.randint(0, config.vocab_size, (phase.batch, phase.new_tokens), device=device,
                            generator=generator)
        return ids, positions
    x = torch.randn(phase.batch, phase.new_tokens, config.hidden_size, device=device, generator=generator)
    if workload.variant.kind == "ffn":
        return (x.to(dtype),)
    with torch.device(device):
        cos, sin = LlamaRotaryEmbedding(transformers_config(config))(x, positions)
    kv = workload.kv_cache
    if kv.elements_per_token == 0 or phase.cached == 0:
        return x.to(dtype), cos.to(dtype), sin.to(dtype)
    if len(kv.per_token) != 3 or kv.per_token[0] != 2:
        raise HwoptError(f"{workload.name}: the measuring backends pass a KV cache of shape (2, heads, head_dim) "
                         f"per token (K and V), not {kv.per_token}; price it with --backend roofline")
    _, heads, width = kv.per_token
    shape = (phase.batch, heads, kv.tokens(phase.cached), width)
    kv_dtype = TORCH_DTYPES[workload.kv_dtype]
    past = [torch.randn(shape, device=device, generator=generator).to(kv_dtype) for _ in range(2)]
    return x.to(dtype), cos.to(dtype), sin.to(dtype), *past


def weight_bytes(module: nn.Module) -> int:
    """Bytes one copy of the module's weights takes."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
