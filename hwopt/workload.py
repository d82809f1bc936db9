"""What a measurement backend times: one sub-block, or the model outside its layers, in a scenario's phases.

Generation is one prefill (``batch x input_len`` new tokens, empty cache)
and then one decode step per further token (``batch x 1`` new tokens against
a cache that grows). A ``Workload`` names the piece of the model and the
phases to time; every backend answers with milliseconds per phase, whether
it runs the piece (torch, ONNX Runtime, TensorRT) or computes its cost
(roofline).

For the backends that run it, the piece is a torch module (``hwopt.steps``).
This module imports neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hwopt.protocols import NO_CACHE, KVCacheShape
from hwopt.search_space import Scenario, SubVariant

MIB = 2**20
ROTATING_INPUTS = 3
ROTATION_BYTES = 512 * MIB
MAX_COPIES = 64


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
    config: object  # the parent's config (hwopt.model.architecture.ModelConfig or transformers' LlamaConfig)
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
