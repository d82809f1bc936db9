"""Calibration: timings measured on a target, and the roofline's efficiency factors fitted to them.

A calibration row is self-contained, so that the model can be recomputed
from it alone (``CalibrationRow``)::

    [[calibration]]
    device = "NVIDIA H100 80GB HBM3"           # where it was measured
    backend = "torch 2.13.0, CUDA 12.8"        # with what
    date = "2025-06-01"
    model = "llama-3.1-70b"                    # a name hwopt.model_source.resolve_model knows
    kind = "attention"                         # "attention", "ffn" or "outside_layers"
    block = { no_op = false, replace_with_linear = false, n_heads_in_group = 8 }  # not for outside_layers
    dtype = "bf16"                             # weights and activations
    kv_dtype = "bf16"                          # the KV cache
    phase = "decode"                           # "prefill" or "decode"
    batch = 64
    new_tokens = 1
    cached = 1152
    ms = 0.123                                 # the measured milliseconds of that one forward

``hwopt calibrate`` (``calibrate``) measures such rows with a measuring
backend and writes the target's TOML file with them (by ``tomli_w``).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tomli_w

from hwopt.cpu_roof import roof_of
from hwopt.errors import HwoptError
from hwopt.roofline import DATASHEET, CostTerms, Efficiency, datasheet_times, roofline, workload_terms
from hwopt.search_space import DTYPE_BYTES, SearchSpace, sub_variant_from_json, sub_variants
from hwopt.targets import Target
from hwopt.timing import median_phases
from hwopt.workload import Phase, Workload, scenario_phases

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
        from hwopt.model_source import resolve_model

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
    from scipy.optimize import least_squares  # here: only a target with calibration rows is fitted (1 s to import)

    def log_ratio(x):
        return np.log(roofline(compute_ms, memory_ms, Efficiency(*x)) / measured_ms)

    bounds = ([1e-3, 1e-3, 0.0], [1.5, 1.5, float(measured_ms.max())])
    small = float(measured_ms.min())
    starts = itertools.product((0.2, 0.6, 1.0), (0.2, 0.6, 1.0), (0.01 * small, 0.5 * small))
    fits = [least_squares(log_ratio, x0, bounds=bounds, x_scale="jac", loss="soft_l1", f_scale=0.25)
            for x0 in starts]
    return Efficiency(*(float(v) for v in min(fits, key=lambda fit: fit.cost).x))


def fit_calibration(target: Target) -> Fit | None:
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
            raise HwoptError(f"target {where}, calibration row {number}: {exc}") from None
        rows.append(row)
        names.append(workload.name)
        times.append(datasheet_times(workload_terms(workload)[0], roof, row.dtype, row.kv_dtype))
    compute_ms, memory_ms = np.array(times).T
    measured = np.array([r.ms for r in rows])
    efficiency = fit_efficiency(compute_ms, memory_ms, measured)
    return Fit(efficiency, tuple(rows), tuple(names), tuple(roofline(compute_ms, memory_ms, DATASHEET)),
               tuple(roofline(compute_ms, memory_ms, efficiency)))


_fits: dict[str, Fit | None] = {}


def calibration_of(target: Target) -> Fit | None:
    """``fit_calibration``, fitted once per distinct target and calibration table in this process."""
    key = json.dumps([target.name, target.peak_tflops, target.bandwidth_gbs, target.calibration], sort_keys=True)
    if key not in _fits:
        _fits[key] = fit_calibration(target)
    return _fits[key]


# ---------------------------------------------------------------- hwopt calibrate


def measure_rows(source, target: Target, scenarios: list, backend, repeats: int) -> list[CalibrationRow]:
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


def without_none(value):
    """``value`` with every None left out of its tables (TOML has no null)."""
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [without_none(v) for v in value]
    return value


def target_toml(target: Target, header: str = "") -> str:
    """A target as TOML that ``Target.from_toml`` reads back into the same fields (``path`` aside)."""
    fields = {f.name: getattr(target, f.name) for f in dataclasses.fields(target) if f.name != "path"}
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + tomli_w.dumps(without_none(fields))


def use_measuring_device(spec: str, target: Target) -> None:
    """``--device`` of calibrate (as ``hwopt.devices.resolve_device`` reads it): the device timed must be of the
    target's kind, for the timings are the target's; a GPU becomes torch's current device, which the measuring
    backends run on. ``auto`` for a GPU target with no GPU here leaves the choice to the backend (one that times
    elsewhere may; the torch backend says it is not available).

    Raises:
        HwoptError: as ``resolve_device``, or a device given of the other kind than the target.
    """
    import torch

    from hwopt.devices import resolve_device

    if spec.strip().lower() == "auto" and target.kind == "gpu" and not torch.cuda.is_available():
        return
    device = resolve_device(spec, target.kind)
    if (device.type == "cuda") != (target.kind == "gpu"):
        here = "this machine's CPU" if device.type == "cpu" else str(device)
        raise HwoptError(f"--device {spec} is {here}, and calibrate times the {target.kind} target {target.name} "
                         f"itself: give --device {'cuda or cuda:N' if target.kind == 'gpu' else 'cpu'}")
    if device.type == "cuda":
        torch.cuda.set_device(device)


def calibrate(target: Target, model: str, scenarios: list, backend_name: str, repeats: int,
              out: Path, device: str = "auto") -> Fit:
    """Measure calibration rows on ``device`` (``use_measuring_device``), write ``out`` (the target's TOML,
    these rows appended) and fit it.

    The target written carries the peaks the factors are relative to: for
    a CPU, the ones measured here, so the file means the same on any machine.
    """
    from hwopt.model_source import resolve_model
    from hwopt.pipeline import atomic_write_text
    from hwopt.plugins import backends

    use_measuring_device(device, target)
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
    header = (f"{target.name} target with block timings measured by hwopt calibrate "
              f"(backend {backend_name}, model {model}), from {target.path or target.name}")
    atomic_write_text(out, target_toml(calibrated, header))
    return fit_calibration(Target.from_toml(out))
