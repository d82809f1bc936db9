"""The profile pass's work (``hwopt.passes.profile``): what each block variant costs on the target.

A measurement backend times each attention and FFN variant, and the part
of the model outside the layers, in prefill (``batch x input_len`` tokens)
and in decode (one token per sequence against a KV cache that grows to
``input_len + output_len``); see ``hwopt.workload``. Decode is timed at the
shortest, middle and longest context and integrated over every step with a
straight-line fit. Memory is weights plus the KV cache at the longest
context. Every figure carries its source: measured (device, backend,
method, date) or estimated (the model that made it, and why nothing was
measured).

``--backend auto`` measures with torch when it can run on the target here,
and otherwise estimates with the roofline model, saying why;
``--require-measured`` turns that fallback into an error.

Measured figures are made to hold on a busy machine (``hwopt.timing``):
every variant is timed in interleaved rounds, each figure carries its
rounds, spread and the standard error of its median, and the profile checks
itself (medians not pinned down, a machine too busy for its threads, the
whole model end to end against the sum of its blocks); a profile that fails
a check is not recorded as up to date.
"""

from __future__ import annotations

import datetime

import psutil

from hwopt.errors import HwoptError
from hwopt.pipeline import atomic_write_json
from hwopt.plugins import backends, block_types
from hwopt.progress import console, progress
from hwopt.search_space import Scenario, SearchSpace, SubVariant, model_sub_variants, sub_variants
from hwopt.timing import (
    PRECISION_BOUND,
    CpuLoad,
    describe_load,
    interleaved_rounds,
    median_error,
    median_phases,
    normalized_rounds,
    oversubscribed,
    spread,
)
from hwopt.workload import MIB, Workload, decode_contexts, phase_totals, scenario_phases

AUTO_MEASURED, AUTO_ESTIMATED = "torch", "roofline"
SPREAD_KEYS = ("prefill_ms", "decode_ms", "runtime_ms")
NOISE = {"median_error": median_error, "spread": spread}  # what a noise bound bounds: hwopt.timing
SELF_CHECK_BOUND = 0.15  # the whole model end to end within 15% of the sum of its blocks
SELF_CHECK_RUNS = 3  # generations of the whole model; the median is compared
QUIET_OTHER_CORES = 0.25  # other processes' load, in cores, under which noise is the machine's own (check_profile)


TIME_KEYS = ("runtime_ms", "prefill_ms", "decode_ms")
SIZE_KEYS = ("num_params", "memory_mib", "kv_cache_mib")


def layer_rows(costs: dict, variants: list[tuple[str, str]]) -> list[dict]:
    """One row per layer from per-variant costs: the attention's and FFN's runtimes apart, and the sums."""
    rows = []
    for i, (attention, ffn) in enumerate(variants):
        a, f = costs["attention"][attention], costs["ffn"][ffn]
        rows.append({"layer": i, "attention": attention, "ffn": ffn,
                     "attention_ms": a["runtime_ms"], "ffn_ms": f["runtime_ms"],
                     **{key: a[key] + f[key] for key in (*TIME_KEYS, *SIZE_KEYS)}})
    return rows


def model_variants(source) -> list[tuple[str, str]]:
    """The (attention, FFN) variant names of every layer of a model."""
    return [(a.name, f.name) for a, f in model_sub_variants(source)]


def model_total(costs: dict, rows: list[dict]) -> dict:
    """Whole-model figures: the layers' rows plus the part outside the layers."""
    outside = costs["outside_layers"]
    return {key: outside[key] + sum(r[key] for r in rows) for key in (*TIME_KEYS, *SIZE_KEYS)}


def cost_entry(variant: SubVariant, config, scenario: Scenario, timing: dict, source: dict) -> dict:
    params = variant.block_type.num_params(variant.config, config)
    kv_elements = variant.block_type.kv_cache(variant.config, config).elements(scenario.max_context)
    weights = params * scenario.bytes_per_element / MIB
    kv_cache = scenario.batch * kv_elements * scenario.kv_bytes_per_element / MIB
    return {
        "config": variant.to_json(config),
        "num_params": params,
        "weights_mib": weights,
        "kv_cache_mib": kv_cache,
        "memory_mib": weights + kv_cache,
        **timing,
        "source": source,
    }


def outside_layers_entry(config, scenario: Scenario, timing: dict, source: dict) -> dict:
    """Embeddings, final norm and LM head (counted once when they are tied)."""
    params = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2) + config.hidden_size
    weights = params * scenario.bytes_per_element / MIB
    return {"num_params": params, "weights_mib": weights, "kv_cache_mib": 0.0, "memory_mib": weights, **timing,
            "source": source}


def choose_backend(name: str, target, scenario: Scenario, require_measured: bool = False):
    """The backend to use and the source label its figures carry.

    ``auto`` is torch where torch can measure on the target here, else the
    roofline estimate, and the label says why nothing was measured.
    """
    why_not_measured = None
    if name == "auto":
        ok, why = backends().get(AUTO_MEASURED).available(target, scenario)
        name = AUTO_MEASURED if ok else AUTO_ESTIMATED
        if not ok:
            why_not_measured = f"{AUTO_MEASURED}: {why}"
    backend = backends().get(name)
    ok, why = backend.available(target, scenario)
    if not ok:
        raise HwoptError(f"cannot profile on {target.name} ({scenario.describe()}) with backend {name}: {why}")
    if not backend.measures:
        if require_measured:
            because = f" ({why_not_measured})" if why_not_measured else ""
            raise HwoptError(f"--require-measured: backend {name} only estimates, and nothing can measure on "
                             f"{target.name} here{because}")
        why_not_measured = why_not_measured or (f"the {name} backend estimates (--backend torch measures, on a "
                                                 "target that is this machine)")
    label = {"kind": "measured" if backend.measures else "estimated", "backend_name": name,
             "target": target.description, **backend.describe(target, scenario),
             "date": datetime.date.today().isoformat()}
    label["summary"] = (f"measured on {label['device']} with {label['backend']}" if backend.measures
                        else f"estimated for {target.description} by {label['model']}")
    if backend.measures:
        label["method"] += ("; median over rounds that time every variant in turn (each round divided by how slow "
                            "the machine ran in it), after warm-up, rotating inputs and weight copies; decode timed at "
                            f"contexts {decode_contexts(scenario)} and integrated linearly")
    else:
        label["reason"] = f"not measured: {why_not_measured}"
    return backend, label


def profile_variants(source, space: SearchSpace) -> list[SubVariant]:
    """Every attention and FFN variant of the space, plus a child's own blocks that lie outside it."""
    variants = {kind: {v.name: v for v in sub_variants(source.config, space, kind)} for kind in ("attention", "ffn")}
    for pair in model_sub_variants(source):
        for v in pair:
            variants[v.kind].setdefault(v.name, v)
    return [*variants["attention"].values(), *variants["ffn"].values()]


def round_noise(workload: Workload, rounds: list[list[float]], scenario: Scenario, measure: str) -> dict[str, float]:
    """Each figure's noise over the rounds, by ``measure`` (a key of ``NOISE``)."""
    per_round = [phase_totals(workload, ms, scenario) for ms in rounds]
    return {key: NOISE[measure]([t[key] for t in per_round]) for key in SPREAD_KEYS}


def noise_bound(max_spread: float | None) -> tuple[str, float]:
    """What the profile bounds, and by how much: the spread with ``--max-spread``, else the medians' precision."""
    return ("median_error", PRECISION_BOUND) if max_spread is None else ("spread", max_spread)


def measure_costs(config, variants: list[SubVariant], target, scenario: Scenario, backend, label: dict,
                  repeats: int, title: str, bound: tuple[str, float] = noise_bound(None)) -> dict:
    """Costs of ``variants`` and of the part outside the layers, by kind and variant name.

    A backend that measures times every piece in ``repeats`` interleaved
    rounds, and in further rounds (for a bounded time, ``hwopt.timing``)
    while a figure's noise exceeds ``bound`` (a key of ``NOISE`` and its
    bound); each round is divided by how slow the machine ran in it
    (``hwopt.timing.normalized_rounds``); each entry carries its ``rounds``,
    the ``spread`` of its figures and their ``median_error``. An estimate is made once.
    """
    phases = scenario_phases(scenario)
    workloads = {(v.kind, v.name): Workload(v, config, scenario.dtype, scenario.kv_dtype, phases) for v in variants}
    workloads["outside_layers", None] = Workload(None, config, scenario.dtype, scenario.kv_dtype, phases)
    rounds = repeats if backend.measures else 1

    def noisy(results: dict) -> list:
        return [key for key, ms in normalized_rounds(results).items()
                if max(round_noise(workloads[key], ms, scenario, bound[0]).values()) > bound[1]]

    with progress(title, total=len(workloads) + rounds) as advance:
        timers = {}
        for key, workload in workloads.items():
            timers[key] = backend.prepare(workload, target)
            advance()
        results = normalized_rounds(interleaved_rounds(timers, rounds, noisy if backend.measures else lambda _: [],
                                                       after_round=advance))
    costs = {"attention": {}, "ffn": {}}
    for (kind, name), workload in workloads.items():
        timing = phase_totals(workload, median_phases(results[kind, name]), scenario)
        if backend.measures:
            timing |= {"rounds": len(results[kind, name])}
            timing |= {measure: round_noise(workload, results[kind, name], scenario, measure) for measure in NOISE}
        if workload.variant is None:
            costs["outside_layers"] = outside_layers_entry(config, scenario, timing, label)
        else:
            costs[kind][name] = cost_entry(workload.variant, config, scenario, timing, label)
    return costs


def cost_entries(costs: dict) -> dict[str, dict]:
    """Every entry of a costs.json by name: the variants, and ``outside_layers``."""
    return {**costs["attention"], **costs["ffn"], "outside_layers": costs["outside_layers"]}


def noisy_entries(costs: dict, bound: tuple[str, float]) -> dict[str, float]:
    """The entries whose largest noise (``bound``: a key of ``NOISE`` and its bound) exceeds the bound, with it."""
    measure, limit = bound
    worst = {name: max(e[measure].values()) for name, e in cost_entries(costs).items() if measure in e}
    return {name: s for name, s in worst.items() if s > limit}


def self_check(source, target, scenario: Scenario, backend, costs: dict) -> dict:
    """The whole model timed end to end against the sum of its blocks' costs, or why that was skipped.

    The model (random weights: timing does not depend on them) generates in
    the scenario ``SELF_CHECK_RUNS`` times; the median is compared. Only
    torch on the CPU runs the same kernels end to end as block by block.
    """

    if not (backend.name == "torch" and target.kind == "cpu"):
        return {"skipped": f"the end-to-end check runs torch on the CPU, not {backend.name} on {target.name}"}
    totals = model_total(costs, layer_rows(costs, model_variants(source)))
    if totals["memory_mib"] * MIB > psutil.virtual_memory().available / 2:
        return {"skipped": f"the whole model ({totals['memory_mib'] / 1024:.1f} GiB with its KV cache) would take "
                           "more than half the free memory"}
    blocks = totals["runtime_ms"]
    import torch  # here and in profile(): ``hwopt estimate`` prices blocks with this module without torch

    from hwopt.evaluate import measure_runtimes
    from hwopt.model.modeling import HeteroLlamaForCausalLM
    from hwopt.steps import TORCH_DTYPES

    torch.manual_seed(0)
    model = HeteroLlamaForCausalLM(source.config, source.block_configs, block_types())
    model = model.to(TORCH_DTYPES[scenario.dtype]).eval()
    whole = measure_runtimes({"model": model}, scenario, source.config.vocab_size, SELF_CHECK_RUNS)["model"]
    ratio = whole / blocks
    return {"end_to_end_ms": whole, "blocks_ms": blocks, "ratio": ratio, "bound": SELF_CHECK_BOUND,
            "ok": abs(ratio - 1) <= SELF_CHECK_BOUND}


def check_profile(costs: dict, check: dict, load: CpuLoad, threads: int | None,
                  max_spread: float | None) -> tuple[list[str], list[str]]:
    """The checks the profile failed, one line each, and its warnings: figures that stayed noisy (medians less
    precise than ``PRECISION_BOUND``, or with ``max_spread`` a spread above it), a machine too busy for the
    ``threads`` timing threads (None: timed off the CPU), a whole model off the sum of its blocks.

    Noise on a quiet machine (other processes kept at most ``QUIET_OTHER_CORES`` of its cores busy) is a
    warning, not a failed check: it is the machine's own scatter, which measuring again later would find as
    well, so the profile is kept rather than measured again (and everything after it redone) on every rerun.

    Raises HwoptError for the first two when ``max_spread`` is given.
    """
    problems, warnings = [], []
    measure, limit = noise_bound(max_spread)
    if noisy := noisy_entries(costs, (measure, limit)):
        rounds = max(e["rounds"] for e in cost_entries(costs).values())
        worst = ", ".join(f"{name} {s:.0%}" for name, s in sorted(noisy.items(), key=lambda kv: -kv[1]))
        what = ("spread = IQR / median" if measure == "spread"
                else "the median's standard error = 1.2533 IQR / (1.349 sqrt(rounds)), relative to it")
        quiet = max_spread is None and load.others <= QUIET_OTHER_CORES
        (warnings if quiet else problems).append(
            f"timings stayed noisy after {rounds} rounds: {worst} ({what}; bound {limit:.0%}); while measuring, "
            f"{load.describe()}")
    if threads is not None and oversubscribed(load.others, threads, len(load.cores)):
        problems.append(f"the machine is too busy to measure: {load.describe()} beside the profile's {threads} "
                        f"timing thread{'s' if threads > 1 else ''}")
    if problems and max_spread is not None:
        raise HwoptError(f"--max-spread {max_spread:g}: {problems[0]}")
    if not check.get("ok", True):
        problems.append(f"the whole model took {check['end_to_end_ms']:.1f} ms end to end, the sum of its blocks "
                        f"{check['blocks_ms']:.1f} ms (ratio {check['ratio']:.2f}, outside 1 ± "
                        f"{SELF_CHECK_BOUND:.2f}); while measuring, {load.describe()}")
    return problems, warnings


def print_checks(costs: dict) -> None:
    """What the profile holds and, for a measured one, what its checks found and its warnings (failed checks are
    the caller's to warn about)."""
    checks, entries = costs["checks"], cost_entries(costs)
    if "self_check" not in checks:
        source = costs["source"]
        reason = f" ({source['reason']})" if "reason" in source else ""
        console.print(f"profile: {len(entries)} pieces {source['summary']}{reason}", soft_wrap=True)
        return
    worst = {measure: max(entries, key=lambda name, m=measure: max(entries[name][m].values())) for measure in NOISE}
    largest = {measure: max(entries[name][measure].values()) for measure, name in worst.items()}
    rounds = max(e["rounds"] for e in entries.values())
    console.print(f"profile: {len(entries)} pieces timed in {rounds} interleaved rounds, largest spread "
                  f"{largest['spread']:.1%} ({worst['spread']}), largest standard error of a median "
                  f"{largest['median_error']:.1%} ({worst['median_error']}); "
                  f"{describe_load(checks['other_busy_cores'], checks['cores'])}", soft_wrap=True)
    check = checks["self_check"]
    if "skipped" in check:
        console.print(f"profile: self-check skipped: {check['skipped']}", soft_wrap=True)
    else:
        console.print(f"profile: self-check: the whole model took {check['end_to_end_ms']:.1f} ms end to end, the "
                      f"sum of its blocks {check['blocks_ms']:.1f} ms (ratio {check['ratio']:.3f})", soft_wrap=True)
    for line in checks.get("warnings", []):
        console.print(f"[yellow]profile: warning: {line}; kept all the same, as measuring again on a machine this "
                      "quiet would scatter as much (--force measures again, --max-spread makes it an error)[/yellow]",
                      soft_wrap=True)


def profile(source, target, scenario: Scenario, space: SearchSpace, backend_name: str, repeats: int,
            out_path, require_measured: bool = False, max_spread: float | None = None) -> dict:
    """Write ``costs.json``: the cost of every sub-block variant and of the rest of the model.

    Measured costs come with their checks (``checks`` in costs.json): the
    spread of every figure and the standard error of its median (the one
    bounded, ``noise_bound``), the load other processes put on the machine,
    and the whole model end to end against the sum of its blocks. Returns
    costs.json's content; ``costs["checks"]["problems"]`` holds one line per
    failed check (empty: the profile can be trusted), ``["warnings"]`` noise
    that measuring again would not cure (``check_profile``). Raises HwoptError,
    when ``max_spread`` (a fraction, e.g. 0.1) is given, if a figure's spread
    stays above it or the machine is too busy to measure.
    """
    import torch

    backend, label = choose_backend(backend_name, target, scenario, require_measured)
    bound = noise_bound(max_spread)
    threads = torch.get_num_threads() if target.kind == "cpu" else None  # None: timed off the CPU
    with CpuLoad() as load:
        pieces = measure_costs(source.config, profile_variants(source, space), target, scenario, backend, label,
                               repeats, f"profile on {target.name} ({label['kind']})", bound)
        check = self_check(source, target, scenario, backend, pieces) if backend.measures else None
    checks = {"noise_bound": dict([bound]), "other_busy_cores": load.others, "cores": len(load.cores),
              "threads": threads, "problems": [], "warnings": []}
    if backend.measures:
        checks["self_check"] = check
        checks["problems"], checks["warnings"] = check_profile(pieces, check, load, threads, max_spread)
    costs = {"target": target.name, "scenario": scenario.to_json(), "source": label, **pieces, "checks": checks}
    atomic_write_json(out_path, costs)
    return costs
