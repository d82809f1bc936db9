"""profile: what every block variant costs on the target in the serving scenario.

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
"""

from __future__ import annotations

import datetime

from hwopt.errors import HwoptError
from hwopt.pipeline import atomic_write_json
from hwopt.plugins import backends
from hwopt.progress import progress
from hwopt.search_space import Scenario, SearchSpace, SubVariant, model_sub_variants, sub_variants
from hwopt.workload import MIB, Workload, decode_contexts, phase_totals, scenario_phases

AUTO_MEASURED, AUTO_ESTIMATED = "torch", "roofline"


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
        why_not_measured = why_not_measured or f"the {name} backend was asked for"
    label = {"kind": "measured" if backend.measures else "estimated", "backend_name": name,
             "target": target.description, **backend.describe(target, scenario),
             "date": datetime.date.today().isoformat()}
    label["summary"] = (f"measured on {label['device']} with {label['backend']}" if backend.measures
                        else f"estimated for {target.description} by {label['model']}")
    if backend.measures:
        label["method"] += (f"; median of repeats after warm-up, rotating inputs and weight copies; decode timed "
                            f"at contexts {decode_contexts(scenario)} and integrated linearly")
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


def measure_costs(config, variants: list[SubVariant], target, scenario: Scenario, backend, label: dict,
                  repeats: int, title: str) -> dict:
    """Costs of ``variants`` and of the part outside the layers, by kind and variant name."""
    phases = scenario_phases(scenario)
    costs = {"attention": {}, "ffn": {}}
    with progress(title, total=len(variants) + 1) as advance:
        for v in variants:
            workload = Workload(v, config, scenario.dtype, scenario.kv_dtype, phases)
            timing = phase_totals(workload, backend.time_phases(workload, target, repeats), scenario)
            costs[v.kind][v.name] = cost_entry(v, config, scenario, timing, label)
            advance()
        workload = Workload(None, config, scenario.dtype, scenario.kv_dtype, phases)
        timing = phase_totals(workload, backend.time_phases(workload, target, repeats), scenario)
        costs["outside_layers"] = outside_layers_entry(config, scenario, timing, label)
        advance()
    return costs


def profile(source, target, scenario: Scenario, space: SearchSpace, backend_name: str, repeats: int,
            out_path, require_measured: bool = False) -> dict:
    """Write ``costs.json``: the cost of every sub-block variant and of the rest of the model."""
    backend, label = choose_backend(backend_name, target, scenario, require_measured)
    costs = {"target": target.name, "scenario": scenario.to_json(), "source": label,
             **measure_costs(source.config, profile_variants(source, space), target, scenario, backend, label,
                             repeats, f"profile on {target.name} ({label['kind']})")}
    atomic_write_json(out_path, costs)
    return costs
