"""What a measurement backend times: one sub-block, or the model outside its layers, in a scenario's phases.

Generation is one prefill (``batch x input_len`` new tokens, empty cache)
and then one decode step per further token (``batch x 1`` new tokens against
a cache that grows). A ``Workload`` names the piece of the model and the
phases to time; every backend answers with milliseconds per phase, whether
it runs the piece (torch, ONNX Runtime, TensorRT) or computes its cost
(roofline).

For the backends that run it, the piece is a ``torch.nn.Module`` whose
inputs and outputs are plain tensors (``build_step`` and ``step_inputs``),
so the same module is timed by torch and exported to ONNX:

* a sub-block step is ``x + sub_block(norm(x))``, with the rotary ``cos``
  and ``sin`` as inputs for attention (the model computes them once per
  forward, outside the layers) and, for a sub-block that caches (its block
  type's ``kv_cache``), the cached keys and values in and the new cache out;
* the outside step is what a generation step does besides the layers:
  embed the tokens, make the rotary tables, normalise the last position,
  the LM head, and pick the next token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from hwopt.errors import HwoptError
from hwopt.model.modeling import KVCache
from hwopt.protocols import NO_CACHE, KVCacheShape
from hwopt.search_space import Scenario, SubVariant

MIB = 2**20
ROTATING_INPUTS = 3
ROTATION_BYTES = 512 * MIB
MAX_COPIES = 64

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "fp8": torch.float8_e4m3fn}


@dataclass(frozen=True)
class Phase:
    """One forward: ``batch`` sequences of ``new_tokens`` each, after ``cached`` tokens already in the cache."""

    name: str  # "prefill" or "decode"
    batch: int
    new_tokens: int
    cached: int

    @property
    def tokens(self) -> int:
        """New tokens over the whole batch."""
        return self.batch * self.new_tokens


@dataclass(frozen=True)
class Workload:
    """A piece of the model to time in some phases; ``variant`` None is the model outside its layers."""

    variant: SubVariant | None
    config: object  # the parent's transformers config
    dtype: str  # weights and activations
    kv_dtype: str  # the KV cache
    phases: tuple[Phase, ...]

    @property
    def name(self) -> str:
        return self.variant.name if self.variant is not None else "outside_layers"

    @property
    def kv_cache(self) -> KVCacheShape:
        """What this piece caches per sequence (its block type's ``kv_cache``; nothing outside the layers)."""
        if self.variant is None:
            return NO_CACHE
        return self.variant.block_type.kv_cache(self.variant.config, self.config)


def decode_contexts(scenario: Scenario) -> list[int]:
    """Cache lengths at which decode is timed: first, middle and last step."""
    first, last = scenario.input_len, scenario.input_len + max(scenario.decode_steps - 1, 0)
    return sorted({first, (first + last) // 2, last})


def scenario_phases(scenario: Scenario) -> tuple[Phase, ...]:
    """The prefill, then decode at each of ``decode_contexts`` (none when there is one output token)."""
    prefill = Phase("prefill", scenario.batch, scenario.input_len, 0)
    if scenario.decode_steps == 0:
        return (prefill,)
    return (prefill, *(Phase("decode", scenario.batch, 1, c) for c in decode_contexts(scenario)))


def integrate_decode(contexts: list[int], step_ms: list[float], scenario: Scenario) -> float:
    """Total decode time: a straight line through the timed steps, summed over every step."""
    if scenario.decode_steps == 0:
        return 0.0
    steps = np.arange(scenario.decode_steps) + scenario.input_len
    if len(contexts) == 1:
        return float(step_ms[0] * len(steps))
    slope, intercept = np.polyfit(contexts, step_ms, 1)
    return float(np.sum(slope * steps + intercept))


def phase_totals(workload: Workload, phase_ms: list[float], scenario: Scenario) -> dict:
    """prefill_ms, decode_ms (every step), runtime_ms and ttft_ms from per-phase times."""
    prefill = phase_ms[0]
    decode_steps = {p.cached: ms for p, ms in zip(workload.phases, phase_ms) if p.name == "decode"}
    decode = integrate_decode(list(decode_steps), list(decode_steps.values()), scenario)
    return {"prefill_ms": prefill, "decode_ms": decode, "runtime_ms": prefill + decode, "ttft_ms": prefill,
            "decode_step_ms": {str(k): v for k, v in decode_steps.items()}}


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
        self.rotary_emb = LlamaRotaryEmbedding(config)
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
        cos, sin = LlamaRotaryEmbedding(config)(x, positions)
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


def kv_dtype_unsupported(scenario, backend_name: str) -> str | None:
    """Why a backend that keeps the KV cache in the compute dtype cannot run the scenario (None: it can)."""
    if scenario.kv_dtype == scenario.dtype:
        return None
    return f"the {backend_name} backend keeps the KV cache in the compute dtype (--kv-dtype must equal --dtype)"


def rotation_size(weight_bytes: int) -> int:
    """How many copies of a module to cycle through so each timed call reads cold weights.

    In the whole model a layer's weights were last read one full forward
    earlier, long evicted from the caches; a lone module timed again and
    again would be served from cache. Copies totalling ROTATION_BYTES, used in
    turn, restore the real situation.
    """
    return max(1, min(MAX_COPIES, -(-ROTATION_BYTES // max(weight_bytes, 1))))


def rotation(copies: list) -> list:
    """The copies in turn, at least ROTATING_INPUTS calls long (each call also gets its own input)."""
    return [copies[k % len(copies)] for k in range(max(len(copies), ROTATING_INPUTS))]
