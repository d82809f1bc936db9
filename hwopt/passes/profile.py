"""profile: what every block variant costs on the target in the serving scenario.

Each attention and FFN variant is built with random weights (timing does
not depend on their values) and timed by a measurement backend in prefill
(``batch x input_len`` tokens) and decode (one token per sequence against a
KV cache that grows to ``input_len + output_len``). Decode is timed at the
shortest, middle and longest context and integrated over every step with a
straight-line fit. The part of the model outside the layers (embeddings,
rotary tables, final norm, LM head, the loop) is timed as a model with no
layers. Memory is weights plus the KV cache at the longest context.
Every figure carries its source.
"""

from __future__ import annotations

import copy
import datetime

import numpy as np
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from hwopt.errors import HwoptError
from hwopt.model.config import sub_block_json
from hwopt.model.modeling import HeteroLlamaForCausalLM, KVCache
from hwopt.pipeline import atomic_write_json
from hwopt.plugins import backends
from hwopt.progress import progress
from hwopt.search_space import Scenario, SearchSpace, SubVariant, sub_variant_of, sub_variants

MIB = 2**20
ROTATING_INPUTS = 3
ROTATION_BYTES = 512 * MIB
MAX_COPIES = 64


def decode_contexts(scenario: Scenario) -> list[int]:
    """Cache lengths at which decode is timed: first, middle and last step."""
    first, last = scenario.input_len, scenario.input_len + max(scenario.decode_steps - 1, 0)
    return sorted({first, (first + last) // 2, last})


def integrate_decode(contexts: list[int], step_ms: list[float], scenario: Scenario) -> float:
    """Total decode time: a straight line through the timed steps, summed over every step."""
    steps = np.arange(scenario.decode_steps) + scenario.input_len
    if len(contexts) == 1:
        return float(step_ms[0] * len(steps))
    slope, intercept = np.polyfit(contexts, step_ms, 1)
    return float(np.sum(slope * steps + intercept))


def _random_cache(config, num_kv_heads: int, scenario: Scenario, context: int, dtype) -> KVCache:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (scenario.batch, num_kv_heads, context, head_dim)
    cache = KVCache(1)
    cache.keys[0], cache.values[0] = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    cache.length = context
    return cache


def rotation_size(weight_bytes: int) -> int:
    """How many copies of a module to cycle through so each timed call reads cold weights.

    In the whole model a layer's weights were last read one full forward
    earlier, long evicted from the CPU caches; a lone module timed again and
    again would be served from cache. Copies totalling ROTATION_BYTES, used in
    turn, restore the real situation.
    """
    return max(1, min(MAX_COPIES, -(-ROTATION_BYTES // max(weight_bytes, 1))))


def rotation(copies: list) -> list:
    """The copies in turn, at least ROTATING_INPUTS calls long (each call also gets its own input)."""
    return [copies[k % len(copies)] for k in range(max(len(copies), ROTATING_INPUTS))]


def time_sub_block(variant: SubVariant, config, scenario: Scenario, backend, dtype, repeats: int) -> dict:
    """Prefill and decode milliseconds of one sub-block (its norm and residual included)."""
    first = variant.block_type.build(variant.config, config)
    if first is None:
        return {"prefill_ms": 0.0, "decode_ms": 0.0, "decode_step_ms": {}}
    weight_bytes = sum(p.numel() for p in first.parameters()) * scenario.bytes_per_element
    copies = [first] + [variant.block_type.build(variant.config, config)
                        for _ in range(rotation_size(weight_bytes) - 1)]
    copies = [m.to(dtype).eval() for m in copies]
    norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps).to(dtype)
    rotary = LlamaRotaryEmbedding(config)
    b, h = scenario.batch, config.hidden_size
    kv_heads = getattr(first, "num_kv_heads", 0)

    def call(args):
        module, x, cache = args
        if variant.kind == "ffn":
            return x + module(norm(x))
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + x.shape[1]).unsqueeze(0)
        if cache is not None:  # a fresh cache object each call, over the same tensors
            cache = _cache_over_same_tensors(cache)
        return x + module(norm(x), rotary(x, positions), cache, 0)

    prefill = backend.time_ms(call, [(m, torch.randn(b, scenario.input_len, h, dtype=dtype), None)
                                     for m in rotation(copies)], repeats=repeats)
    step_ms = {}
    for context in decode_contexts(scenario):
        inputs = [(m, torch.randn(b, 1, h, dtype=dtype),
                   _random_cache(config, kv_heads, scenario, context, dtype) if kv_heads else None)
                  for m in rotation(copies)]
        step_ms[context] = backend.time_ms(call, inputs, repeats=repeats)
    decode = integrate_decode(list(step_ms), list(step_ms.values()), scenario)
    return {"prefill_ms": prefill, "decode_ms": decode, "decode_step_ms": {str(k): v for k, v in step_ms.items()},
            "rotated_copies": len(copies)}


def _cache_over_same_tensors(cache: KVCache) -> KVCache:
    """A new cache object on the same tensors, so the timed call's append leaves ``cache`` as it was."""
    fresh = KVCache(1)
    fresh.keys[0], fresh.values[0], fresh.length = cache.keys[0], cache.values[0], cache.length
    return fresh


def time_outside_layers(config, scenario: Scenario, backend, dtype, repeats: int) -> dict:
    """The model with no layers: embeddings, rotary tables, final norm and LM head."""
    bare_config = copy.deepcopy(config)
    bare_config.num_hidden_layers = 0
    first = HeteroLlamaForCausalLM(bare_config, []).to(dtype).eval()
    params = first.num_parameters()
    models = [first] + [HeteroLlamaForCausalLM(bare_config, []).to(dtype).eval()
                        for _ in range(rotation_size(params * scenario.bytes_per_element) - 1)]

    def call(args):
        model, ids, context = args
        cache = None
        if context is not None:
            cache = KVCache(0)
            cache.length = context
        return model(ids, past_key_values=cache, logits_to_keep=1)

    prompts = [(m, torch.randint(0, config.vocab_size, (scenario.batch, scenario.input_len)), None)
               for m in rotation(models)]
    prefill = backend.time_ms(call, prompts, repeats=repeats)
    step_ms = {}
    for context in decode_contexts(scenario):
        inputs = [(m, torch.randint(0, config.vocab_size, (scenario.batch, 1)), context) for m in rotation(models)]
        step_ms[context] = backend.time_ms(call, inputs, repeats=repeats)
    decode = integrate_decode(list(step_ms), list(step_ms.values()), scenario)
    return {"prefill_ms": prefill, "decode_ms": decode, "decode_step_ms": {str(k): v for k, v in step_ms.items()},
            "rotated_copies": len(models), "num_params": params,
            "weights_mib": params * scenario.bytes_per_element / MIB}


def cost_entry(variant: SubVariant, config, scenario: Scenario, timing: dict, source: dict) -> dict:
    params = variant.block_type.num_params(variant.config, config)
    kv_elements = variant.block_type.kv_cache_elements_per_token(variant.config, config)
    weights = params * scenario.bytes_per_element / MIB
    kv_cache = scenario.batch * scenario.max_context * kv_elements * scenario.bytes_per_element / MIB
    return {
        "config": sub_block_json(variant.config, config.hidden_size),
        "num_params": params,
        "weights_mib": weights,
        "kv_cache_mib": kv_cache,
        "memory_mib": weights + kv_cache,
        **timing,
        "runtime_ms": timing["prefill_ms"] + timing["decode_ms"],
        "source": source,
    }


def measurement_backend(name: str, target):
    """The backend called ``name``, if it can measure on ``target`` here; else a clear error."""
    backend = backends().get(name)
    ok, why = backend.available(target)
    if not ok:
        raise HwoptError(f"cannot measure on target {target.name} with backend {name}: {why}")
    return backend


def profile(source, target, scenario: Scenario, space: SearchSpace, backend_name: str, repeats: int,
            out_path) -> dict:
    """Write ``costs.json``: the cost of every sub-block variant and of the rest of the model."""
    backend = measurement_backend(backend_name, target)
    if scenario.dtype != "fp32":
        raise HwoptError(f"the {backend_name} backend on the CPU measures fp32 only, not {scenario.dtype}")
    config, dtype = source.config, torch.float32
    variants = {kind: sub_variants(config, space, kind) for kind in ("attention", "ffn")}
    for block in source.block_configs:  # a child's own blocks may lie outside the space
        for kind, cfg in (("attention", block.attention), ("ffn", block.ffn)):
            v = sub_variant_of(config, cfg)
            if v.name not in {x.name for x in variants[kind]}:
                variants[kind].append(v)
    source_label = {
        "kind": "measured",
        "device": target.description,
        "backend": backend.describe(),
        "method": f"median of {repeats} after warm-up, rotating inputs and weight copies (>= 512 MiB) so "
                  "weights are read cold as in the whole model; "
                  f"decode timed at contexts {decode_contexts(scenario)} and integrated linearly",
        "date": datetime.date.today().isoformat(),
    }
    costs = {"target": target.name, "scenario": scenario.to_json(), "source": source_label,
             "attention": {}, "ffn": {}}
    torch.manual_seed(0)
    all_variants = [v for kind in ("attention", "ffn") for v in variants[kind]]
    with progress(f"profile on {target.name}", total=len(all_variants) + 1) as advance:
        for v in all_variants:
            timing = time_sub_block(v, config, scenario, backend, dtype, repeats)
            costs[v.kind][v.name] = cost_entry(v, config, scenario, timing, source_label)
            advance()
        outside = time_outside_layers(config, scenario, backend, dtype, repeats)
        outside.update(runtime_ms=outside["prefill_ms"] + outside["decode_ms"], memory_mib=outside["weights_mib"],
                       source=source_label)
        costs["outside_layers"] = outside
        advance()
    atomic_write_json(out_path, costs)
    return costs
