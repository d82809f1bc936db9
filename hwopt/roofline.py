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
overhead) it is a lower bound; a profile's ``[[calibration]]`` table of
measured timings fits the three factors (``fit_calibration``), and
``calibrate`` measures such a table.

A calibration row is self-contained, so that the model can be recomputed
from it alone (``CalibrationRow``)::

    [[calibration]]
    device = "NVIDIA H100 80GB HBM3"           # where it was measured
    backend = "torch 2.13.0, CUDA 12.8"        # with what
    date = "2025-06-01"
    model = "llama-3.1-70b"                    # a name hwopt.models.resolve_model knows
    kind = "attention"                         # "attention", "ffn" or "outside_layers"
    block = { no_op = false, replace_with_linear = false, n_heads_in_group = 8 }  # not for outside_layers
    dtype = "bf16"                             # weights and activations
    kv_dtype = "bf16"                          # the KV cache
    phase = "decode"                           # "prefill" or "decode"
    batch = 64
    new_tokens = 1
    cached = 1152
    ms = 0.123                                 # the measured milliseconds of that one forward
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import least_squares

from hwopt.errors import HwoptError
from hwopt.hardware import HardwareProfile
from hwopt.model.config import head_dim
from hwopt.search_space import DTYPE_BYTES, SearchSpace, SubVariant, sub_variant_from_json, sub_variants
from hwopt.timing import median_phases
from hwopt.workload import TORCH_DTYPES, Phase, Workload, scenario_phases

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
    return np.maximum(compute_ms / efficiency.compute, memory_ms / efficiency.memory) + efficiency.overhead_ms


def roofline_ms(terms: CostTerms, roof: Roof, dtype: str, kv_dtype: str, efficiency: Efficiency = DATASHEET) -> float:
    """The roofline's milliseconds for one phase of one piece; a piece that does nothing takes none."""
    if terms == CostTerms():  # a removed sub-block launches nothing, so it has no overhead either
        return 0.0
    return float(roofline(*datasheet_times(terms, roof, dtype, kv_dtype), efficiency))


# ---------------------------------------------------------------- the ceilings of a target

CPU_BENCH_DTYPES = ("fp32", "bf16")  # what torch computes in on a CPU
BENCH_MATMUL = 1536  # square matmul side: big enough to reach the GEMM peak, about a second in all on 2 cores
BENCH_GEMV_MIB = 256  # far beyond any CPU cache
BENCH_REPEATS = 3


def roof_of(target: HardwareProfile) -> Roof:
    """The profile's peaks; for a CPU whose profile gives none, this machine's, measured once and cached."""
    if target.kind == "cpu" and target.bandwidth_gbs is None and not target.peak_tflops:
        return measured_cpu_roof(f"{target.description}, torch with {torch.get_num_threads()} threads")
    where = target.path.name if target.path else f"the {target.name} profile"
    return Roof(dict(target.peak_tflops), target.bandwidth_gbs, f"the peaks of {target.description} in {where}")


def measured_cpu_roof(machine: str) -> Roof:
    """This machine's roof from the cache file (``$HWOPT_CACHE/cpu-roofs.json``), measured on a miss."""
    from hwopt.builtin.models import cache_root

    return _cached_cpu_roof(machine, str(cache_root() / "cpu-roofs.json"))


@functools.cache
def _cached_cpu_roof(machine: str, cache_file: str) -> Roof:
    from hwopt.pipeline import atomic_write_text

    path = Path(cache_file)
    try:
        known = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # no cache yet, or a damaged one: measure again
        known = {}
    if machine not in known:
        known[machine] = dataclasses.asdict(measure_cpu_roof(machine))
        atomic_write_text(path, json.dumps(known, indent=2) + "\n")
    return Roof(**known[machine])


def best_seconds(call) -> float:
    """The fastest of BENCH_REPEATS timed calls, after one warm-up call."""
    call()
    times = []
    for _ in range(BENCH_REPEATS):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_tflops(dtype: str) -> float:
    n = BENCH_MATMUL
    a, b = (torch.randn(n, n).to(TORCH_DTYPES[dtype]) for _ in range(2))
    return 2 * n**3 / best_seconds(lambda: a @ b) / 1e12


def gemv_gbs() -> float:
    """GB/s at which a matrix-vector product streams its matrix: the ceiling of decode, which reads weights so.

    A plain copy reaches a different (on small VMs, several times higher)
    figure than the GEMV kernels an LLM's decode actually runs.
    """
    side = int((BENCH_GEMV_MIB * 2**20 // 4) ** 0.5)
    matrix, vector = torch.randn(side, side), torch.randn(side)
    return matrix.nbytes / best_seconds(lambda: matrix @ vector) / 1e9


@torch.inference_mode()
def measure_cpu_roof(machine: str) -> Roof:
    """Micro-benchmarks (a couple of seconds): a square matmul per dtype, and a big fp32 matrix-vector product."""
    peaks = {dtype: round(matmul_tflops(dtype), 5) for dtype in CPU_BENCH_DTYPES}
    source = (f"peaks measured by hwopt on {datetime.date.today().isoformat()} on {machine}: best of "
              f"{BENCH_REPEATS} {BENCH_MATMUL}x{BENCH_MATMUL} matmuls per dtype and {BENCH_GEMV_MIB} MiB matrix-vector "
              "products")
    return Roof(peaks, round(gemv_gbs(), 2), source)


# ---------------------------------------------------------------- calibration rows and the fit

ROW_FIELDS = {"device": str, "backend": str, "date": str, "model": str, "kind": str, "dtype": str, "kv_dtype": str,
              "phase": str, "batch": int, "new_tokens": int, "cached": int, "ms": float}
KINDS = ("attention", "ffn", "outside_layers")
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class CalibrationRow:
    """One measured timing: one forward of one piece of a model (the format is in this module's docstring)."""

    device: str
    backend: str
    date: str
    model: str
    kind: str
    block: dict | None  # the sub-block's block_configs entry; None for outside_layers
    dtype: str
    kv_dtype: str
    phase: str
    batch: int
    new_tokens: int
    cached: int
    ms: float

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationRow:
        """A row read from TOML, checked field by field (a clear HwoptError names the field)."""
        values = {}
        for name, kind in ROW_FIELDS.items():
            if name not in data:
                raise HwoptError(f"lacks the field {name!r}")
            value = data[name]
            ok = (isinstance(value, (int, float)) if kind is float else isinstance(value, kind))
            if not ok or isinstance(value, bool):
                raise HwoptError(f"field {name!r} must be {kind.__name__}, not {value!r}")
            values[name] = value
        choices = {"kind": KINDS, "phase": PHASES, "dtype": tuple(DTYPE_BYTES), "kv_dtype": tuple(DTYPE_BYTES)}
        for name, allowed in choices.items():
            if values[name] not in allowed:
                raise HwoptError(f"field {name!r} is {values[name]!r}, not one of {', '.join(allowed)}")
        for name, least in (("batch", 1), ("new_tokens", 1), ("cached", 0)):
            if values[name] < least:
                raise HwoptError(f"field {name!r} must be at least {least}, not {values[name]}")
        if values["ms"] <= 0:
            raise HwoptError(f"field 'ms' must be positive, not {values['ms']}")
        block = data.get("block")
        if values["kind"] != "outside_layers" and not isinstance(block, dict):
            raise HwoptError(f"an {values['kind']} row needs the field 'block' (an inline table), not {block!r}")
        return cls(block=block if values["kind"] != "outside_layers" else None, **values)

    def as_dict(self) -> dict:
        """The row as its TOML table holds it (no ``block`` for outside_layers: TOML has no null)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def workload(self) -> Workload:
        """The piece and the phase this row timed, rebuilt from the row alone."""
        from hwopt.models import resolve_model

        config = resolve_model(self.model).config
        variant = None
        if self.kind in ("attention", "ffn"):
            variant = sub_variant_from_json(self.kind, self.block, config, "field 'block'")
        phase = Phase(self.phase, self.batch, self.new_tokens, self.cached)
        return Workload(variant, config, self.dtype, self.kv_dtype, (phase,))


@dataclass(frozen=True)
class Fit:
    """Efficiency factors fitted to a calibration table, and the model's error on each row before and after."""

    efficiency: Efficiency
    rows: tuple[CalibrationRow, ...]
    names: tuple[str, ...]  # the variant each row timed
    datasheet_ms: tuple[float, ...]
    fitted_ms: tuple[float, ...]

    def errors(self, predicted_ms) -> np.ndarray:
        """Relative error of each prediction: predicted / measured - 1."""
        return np.asarray(predicted_ms) / np.array([r.ms for r in self.rows]) - 1

    def accuracy(self, predicted_ms) -> str:
        errors = np.abs(self.errors(predicted_ms))
        return f"median {np.median(errors):.1%}, max {errors.max():.1%}"

    def provenance(self) -> str:
        """Where the timings come from: ``24 timings from <devices>, <backends>, <dates>``."""
        def distinct(field):
            return " / ".join(dict.fromkeys(getattr(r, field) for r in self.rows))
        return f"{len(self.rows)} timings from {distinct('device')}, {distinct('backend')}, {distinct('date')}"

    def summary(self) -> str:
        return (f"{self.efficiency.describe()}; fit error {self.accuracy(self.fitted_ms)} "
                f"(datasheet roofline: {self.accuracy(self.datasheet_ms)})")

    def report(self) -> str:
        """A table of every row, measured against the datasheet roofline and the fitted one, then the summary."""
        header = (f"{'#':>3} {'kind':<14} {'variant':<14} {'phase':<8} {'batch':>5} {'new':>5} {'cached':>6} "
                  f"{'measured ms':>12} {'datasheet ms':>13} {'err':>7} {'fitted ms':>10} {'err':>7}")
        lines = [f"calibration: {self.provenance()}", header]
        before, after = self.errors(self.datasheet_ms), self.errors(self.fitted_ms)
        for i, (row, name) in enumerate(zip(self.rows, self.names)):
            lines.append(f"{i + 1:>3} {row.kind:<14} {name:<14} {row.phase:<8} {row.batch:>5} {row.new_tokens:>5} "
                         f"{row.cached:>6} {row.ms:>12.4g} {self.datasheet_ms[i]:>13.4g} {before[i]:>7.1%} "
                         f"{self.fitted_ms[i]:>10.4g} {after[i]:>7.1%}")
        lines.append(f"fitted: {self.summary()}")
        return "\n".join(lines)


def fit_efficiency(compute_ms: np.ndarray, memory_ms: np.ndarray, measured_ms: np.ndarray) -> Efficiency:
    """Least squares on log(predicted / measured), over 0 < e <= 1.5 and overhead >= 0, from a few starts.

    The loss is robust (soft L1 beyond a 25% error) so that a timing another
    process disturbed does not pull the factors. The max() in the roofline
    makes the objective piecewise, so one start can stall on the wrong side
    of a kink; the best of a small grid of starts does not.
    """
    def log_ratio(x):
        return np.log(roofline(compute_ms, memory_ms, Efficiency(*x)) / measured_ms)

    bounds = ([1e-3, 1e-3, 0.0], [1.5, 1.5, float(measured_ms.max())])
    small = float(measured_ms.min())
    starts = itertools.product((0.2, 0.6, 1.0), (0.2, 0.6, 1.0), (0.01 * small, 0.5 * small))
    fits = [least_squares(log_ratio, x0, bounds=bounds, x_scale="jac", loss="soft_l1", f_scale=0.25)
            for x0 in starts]
    return Efficiency(*(float(v) for v in min(fits, key=lambda fit: fit.cost).x))


def fit_calibration(target: HardwareProfile) -> Fit | None:
    """The roofline fitted to the target's ``[[calibration]]`` rows; None when it has none."""
    if not target.calibration:
        return None
    roof = roof_of(target)
    rows, names, times = [], [], []
    for number, data in enumerate(target.calibration, 1):
        try:
            row = CalibrationRow.from_dict(data)
            workload = row.workload()
            lack = roof.lacks(row.dtype)
            if lack:
                raise HwoptError(f"the roofline has {lack}")
        except HwoptError as exc:
            where = target.path or target.name
            raise HwoptError(f"hardware profile {where}, calibration row {number}: {exc}") from None
        rows.append(row)
        names.append(workload.name)
        times.append(datasheet_times(workload_terms(workload)[0], roof, row.dtype, row.kv_dtype))
    compute_ms, memory_ms = np.array(times).T
    measured = np.array([r.ms for r in rows])
    efficiency = fit_efficiency(compute_ms, memory_ms, measured)
    return Fit(efficiency, tuple(rows), tuple(names), tuple(roofline(compute_ms, memory_ms, DATASHEET)),
               tuple(roofline(compute_ms, memory_ms, efficiency)))


_fits: dict[str, Fit | None] = {}


def calibration_of(target: HardwareProfile) -> Fit | None:
    """``fit_calibration``, fitted once per distinct profile and calibration table in this process."""
    key = json.dumps([target.name, target.peak_tflops, target.bandwidth_gbs, target.calibration], sort_keys=True)
    if key not in _fits:
        _fits[key] = fit_calibration(target)
    return _fits[key]


# ---------------------------------------------------------------- hwopt calibrate


def measure_rows(source, target: HardwareProfile, scenarios: list, backend, repeats: int) -> list[CalibrationRow]:
    """Time every attention and FFN variant of the search space, and the rest of the model, in each phase."""
    from hwopt.progress import progress

    config = source.config
    pieces = [v for kind in ("attention", "ffn") for v in sub_variants(config, SearchSpace(), kind)] + [None]
    today = datetime.date.today().isoformat()
    rows = []
    with progress(f"calibrate {target.name} with {backend.name}", total=len(scenarios) * len(pieces)) as advance:
        for scenario, variant in itertools.product(scenarios, pieces):
            advance()
            phases = scenario_phases(scenario)
            workload = Workload(variant, config, scenario.dtype, scenario.kv_dtype, phases)
            if all(terms == CostTerms() for terms in workload_terms(workload)):  # a no-op: nothing to time
                continue
            about = backend.describe(target, scenario)
            kind = variant.kind if variant else "outside_layers"
            block = None if variant is None else {
                k: v for k, v in variant.to_json(config).items() if v is not None}
            timer = backend.prepare(workload, target)
            for phase, ms in zip(phases, median_phases([timer() for _ in range(repeats)])):
                rows.append(CalibrationRow(about["device"], about["backend"], today, source.label, kind, block,
                                           scenario.dtype, scenario.kv_dtype, phase.name, phase.batch,
                                           phase.new_tokens, phase.cached, float(ms)))
    return rows


def toml_value(value) -> str:
    """A TOML value: strings through json.dumps (a valid TOML basic string), tables inline, None left out."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value) if isinstance(value, str) else repr(value)
    if isinstance(value, dict):
        items = [f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def profile_toml(profile: HardwareProfile, header: str = "") -> str:
    """A profile as TOML that ``HardwareProfile.from_toml`` reads back into the same fields (``path`` aside)."""
    top, tables = [], []
    for f in dataclasses.fields(profile):
        value = getattr(profile, f.name)
        if f.name in ("path", "calibration") or value is None:
            continue
        if isinstance(value, dict):
            tables += ["", f"[{f.name}]", *(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())]
        else:
            top.append(f"{f.name} = {toml_value(value)}")
    rows = [line for row in profile.calibration
            for line in ("", "[[calibration]]", *(f"{toml_key(k)} = {toml_value(v)}" for k, v in row.items()))]
    comments = [f"# {line}" for line in header.splitlines()]
    return "\n".join([*comments, *top, *tables, *rows]) + "\n"


def calibrate(target: HardwareProfile, model: str, scenarios: list, backend_name: str, repeats: int,
              out: Path) -> Fit:
    """Measure calibration rows, write ``out`` (the target's profile, these rows appended) and fit it.

    The profile written carries the peaks the factors are relative to: for
    a CPU, the ones measured here, so the file means the same on any machine.
    """
    from hwopt.models import resolve_model
    from hwopt.pipeline import atomic_write_text
    from hwopt.plugins import backends

    backend = backends().get(backend_name)
    if not backend.measures:
        raise HwoptError(f"calibrate needs a backend that measures; {backend_name} estimates")
    for scenario in scenarios:
        ok, why = backend.available(target, scenario)
        if not ok:
            raise HwoptError(f"cannot calibrate {target.name} with backend {backend_name}: {why}")
    rows = measure_rows(resolve_model(model), target, scenarios, backend, repeats)
    roof = roof_of(target)
    calibrated = dataclasses.replace(
        target, bandwidth_gbs=roof.bandwidth_gbs, peak_tflops=roof.peak_tflops,
        sources={"bandwidth_gbs": roof.source, "peak_tflops": roof.source, **target.sources},
        calibration=(*target.calibration, *(row.as_dict() for row in rows)))
    header = (f"{target.name} profile with block timings measured by hwopt calibrate "
              f"(backend {backend_name}, model {model}), from {target.path or target.name}")
    atomic_write_text(out, profile_toml(calibrated, header))
    return fit_calibration(HardwareProfile.from_toml(out))
