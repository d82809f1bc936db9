"""The analytic cost model: what each piece of the model computes and moves, and the roofline that prices it.

A phase (``hwopt.workload.Phase``: ``batch`` sequences of ``new_tokens``
each, after ``cached`` tokens already in the KV cache) of a sub-block or of
the model outside its layers has ``CostTerms``: FLOPs, and the elements it
moves from and to memory, split by the dtype they are stored in. Block
types give theirs (``cost_terms`` in ``hwopt.builtin.block_types``); the
part outside the layers is ``outside_layers_terms`` here. Counting
conventions, with ``t = batch * new_tokens`` tokens in the phase:

* FLOPs: a ``t x in`` by ``in x out`` matmul is ``2 t in out``. Attention's
  scores QKᵀ and its AV take ``2 head_dim`` each per (query head, key)
  pair; causally, the i-th of n new tokens sees the cached keys and i new
  ones, so a sequence has ``n cached + n (n + 1) / 2`` pairs (on average
  ``cached + (n + 1) / 2`` keys per query; a decode token sees
  ``cached + 1``). SwiGLU's ``silu(gate) * up`` counts ``SILU_PRODUCT_FLOPS``
  per element. Norms, residual adds, rotary, softmax and argmax are counted
  by their memory traffic only: a few FLOPs per element, far from any peak.
* Weights: every parameter is read once per forward (the block type's
  ``num_params``), except the embedding table, of which only the rows of the
  phase's tokens are gathered.
* KV cache: attention reads the keys and values of the ``cached`` tokens
  (none at a prefill from an empty cache) and writes those of the new
  tokens, in the KV dtype.
* Activations, as an eager run moves them: each matmul reads its input and
  writes its output; the RMSNorm reads x and writes norm(x), the residual
  add reads x and the sub-block's output and writes the sum (``5 t hidden``
  around every sub-block that is there); SwiGLU's product reads gate and up
  and writes one; the attention core reads Q and writes its output. These
  intermediates matter at the prefill of a narrow model; at decode they are
  small beside the weights.

The roofline prices a phase as ``max(FLOPs / (peak · e_compute), bytes /
(bandwidth · e_memory)) + overhead``. With the datasheet (``e = 1``, no
overhead) it is a lower bound; a target's ``[[calibration]]`` table of
measured timings fits the three factors (``fit_calibration``), and
``calibrate`` measures such a table (both in ``hwopt.calibration``); a
target's peaks come from ``hwopt.cpu_roof.roof_of``, measured on this CPU
when its target gives none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hwopt.errors import HwoptError
from hwopt.model.config import head_dim
from hwopt.search_space import DTYPE_BYTES

if TYPE_CHECKING:  # this module imports no torch: ``hwopt estimate`` prices a config without it
    from hwopt.search_space import SubVariant
    from hwopt.workload import Phase, Workload

SILU_PRODUCT_FLOPS = 5  # silu(g) * u: negate, exp, add one, divide, multiply


# ---------------------------------------------------------------- cost terms


@dataclass(frozen=True)
class CostTerms:
    """What one forward of a piece of the model does: FLOPs, and elements moved, by the dtype they are in."""

    flops: int = 0
    weights: int = 0  # weight elements read, in the compute dtype
    kv_read: int = 0  # KV-cache elements read, in the KV dtype
    kv_written: int = 0  # KV-cache elements written (the new tokens' keys and values)
    activations: int = 0  # activation elements read and written, in the compute dtype

    def __add__(self, other: CostTerms) -> CostTerms:
        return CostTerms(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def __rmul__(self, times: int) -> CostTerms:
        return CostTerms(*(times * a for a in dataclasses.astuple(self)))

    def bytes(self, dtype: str, kv_dtype: str) -> int:
        return ((self.weights + self.activations) * DTYPE_BYTES[dtype]
                + (self.kv_read + self.kv_written) * DTYPE_BYTES[kv_dtype])


def matmul(tokens: int, n_in: int, n_out: int, into_cache: bool = False) -> CostTerms:
    """``tokens x n_in`` times the weight: reads the input, writes the output (to the KV cache for K and V).

    The weight itself is counted once per sub-block, from its ``num_params``.
    """
    output = tokens * n_out
    return CostTerms(flops=2 * tokens * n_in * n_out, activations=tokens * n_in + (0 if into_cache else output),
                     kv_written=output if into_cache else 0)


def norm_and_residual(tokens: int, hidden: int) -> CostTerms:
    """``x + f(norm(x))`` around a sub-block: norm reads x, writes norm(x); the add reads x and f(..), writes."""
    return CostTerms(activations=5 * tokens * hidden)


def attended_pairs(phase: Phase, window: int | None = None) -> int:
    """(query, key) pairs per head: each new token sees the cache and, causally, the new tokens up to itself.

    With a ``window``, a token sees at most the last ``window`` tokens (itself included).
    """
    n, cached = phase.new_tokens, phase.cached
    unclipped = n if window is None else max(0, min(n, window - cached))  # new tokens that see everything before
    return phase.batch * (unclipped * cached + unclipped * (unclipped + 1) // 2 + (n - unclipped) * (window or 0))


def outside_layers_terms(config, phase: Phase) -> CostTerms:
    """A generation step without its layers: embedding gather, rotary tables, final norm, LM head, argmax.

    Only the last position of each sequence goes through the final norm and
    the LM head (generation needs one next token per sequence).
    """
    tokens, batch, hidden, vocab = phase.tokens, phase.batch, config.hidden_size, config.vocab_size
    embed = CostTerms(weights=tokens * hidden, activations=tokens * hidden)  # one row gathered per token
    rotary = CostTerms(activations=2 * phase.new_tokens * head_dim(config))  # cos and sin, shared by the batch
    final_norm = CostTerms(weights=hidden, activations=2 * batch * hidden)
    lm_head = CostTerms(weights=hidden * vocab) + matmul(batch, hidden, vocab)
    argmax = CostTerms(activations=batch * vocab)
    return embed + rotary + final_norm + lm_head + argmax


def piece_terms(variant: SubVariant | None, config, phase: Phase) -> CostTerms:
    """The cost terms of a sub-block variant, or of the model outside its layers (``variant`` None)."""
    if variant is None:
        return outside_layers_terms(config, phase)
    cost_terms = getattr(variant.block_type, "cost_terms", None)
    if cost_terms is None:
        raise HwoptError(f"block type {variant.block_type.name!r} gives no cost_terms, so the roofline "
                         f"cannot price {variant.name}")
    return cost_terms(variant.config, config, phase)


def workload_terms(workload: Workload) -> list[CostTerms]:
    """The cost terms of each of a workload's phases."""
    return [piece_terms(workload.variant, workload.config, phase) for phase in workload.phases]


# ---------------------------------------------------------------- the roofline


@dataclass(frozen=True)
class Roof:
    """A target's ceilings: dense TFLOP/s per dtype and memory GB/s, and where they come from."""

    peak_tflops: dict[str, float]
    bandwidth_gbs: float | None
    source: str

    def lacks(self, dtype: str) -> str | None:
        """What the roofline would need for ``dtype`` and does not have (None: nothing)."""
        if not self.bandwidth_gbs:
            return "no memory bandwidth (bandwidth_gbs)"
        if not self.peak_tflops.get(dtype):
            return f"no {dtype} peak rate (peak_tflops.{dtype})"
        return None

    def rates(self, dtype: str) -> str:
        return f"{self.peak_tflops[dtype]:.4g} TFLOP/s {dtype}, {self.bandwidth_gbs:.4g} GB/s"


@dataclass(frozen=True)
class Efficiency:
    """The fractions of the peak rate and bandwidth reached, and a fixed cost per call."""

    compute: float = 1.0
    memory: float = 1.0
    overhead_ms: float = 0.0

    def describe(self) -> str:
        return (f"e_compute={self.compute:.3g}, e_memory={self.memory:.3g}, "
                f"overhead={self.overhead_ms * 1e3:.3g} µs")


DATASHEET = Efficiency()


def datasheet_times(terms: CostTerms, roof: Roof, dtype: str, kv_dtype: str) -> tuple[float, float]:
    """Milliseconds for the FLOPs at the peak rate and for the bytes at full bandwidth."""
    compute_ms = terms.flops / (roof.peak_tflops[dtype] * 1e9)
    memory_ms = terms.bytes(dtype, kv_dtype) / (roof.bandwidth_gbs * 1e6)
    return compute_ms, memory_ms


def roofline(compute_ms, memory_ms, efficiency: Efficiency):
    """max(compute / e_compute, memory / e_memory) + overhead, for numbers or numpy arrays."""
    import numpy as np  # here: block types price their costs with this module, and listing them needs no numpy

    return np.maximum(compute_ms / efficiency.compute, memory_ms / efficiency.memory) + efficiency.overhead_ms


def roofline_ms(terms: CostTerms, roof: Roof, dtype: str, kv_dtype: str, efficiency: Efficiency = DATASHEET) -> float:
    """The roofline's milliseconds for one phase of one piece; a piece that does nothing takes none."""
    if terms == CostTerms():  # a removed sub-block launches nothing, so it has no overhead either
        return 0.0
    return float(roofline(*datasheet_times(terms, roof, dtype, kv_dtype), efficiency))
