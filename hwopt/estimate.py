"""``hwopt estimate``: how fast, how big, how many tokens/s is an architecture on a target.

Any architecture: a model name, a Llama directory or config.json, or a
nemotron-nas (child) config.json; weights are not needed. Each distinct
attention and FFN block is costed once by a backend (the roofline model
unless told otherwise) and the per-layer rows are summed with the part
outside the layers.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from hwopt.profiling import SIZE_KEYS, TIME_KEYS, choose_backend, layer_rows, measure_costs, model_total
from hwopt.search_space import Scenario, model_sub_variants
from hwopt.targets import Target
from hwopt.workload import MIB


def estimate(source, target: Target, scenario: Scenario, backend_name: str = "roofline",
             repeats: int = 3, require_measured: bool = False, profiled: dict | None = None) -> dict:
    """Per-layer and whole-model runtime, memory and throughput of ``source`` on ``target``.

    ``profiled``: a run's profile (its ``costs.json``), whose costs are taken as they are, with nothing timed,
    where it holds for ``target`` and ``scenario`` and covers every block of ``source`` (``from_profile``).

    Raises:
        HwoptError: ``require_measured`` and the backend only estimates (see ``choose_backend``).
    """
    layers = model_sub_variants(source)
    unique = {(v.kind, v.name): v for pair in layers for v in pair}
    reused = from_profile(profiled, unique, target, scenario)
    if reused:
        costs, label = profiled, profiled["source"]
    else:
        backend, label = choose_backend(backend_name, target, scenario, require_measured)
        costs = measure_costs(source.architecture, list(unique.values()), target, scenario, backend, label, repeats,
                              f"estimate on {target.name} ({label['kind']})")
    rows = layer_rows(costs, [(a.name, f.name) for a, f in layers])
    outside = costs["outside_layers"]
    total = model_total(costs, rows)
    total["ttft_ms"] = total["prefill_ms"]
    total["tokens_per_s"] = scenario.throughput(total["runtime_ms"])
    if target.memory_gib:
        total["fits_in_memory"] = total["memory_mib"] * MIB <= target.memory_gib * 2**30
    return {"model": source.label, "target": target.name, "target_description": target.description,
            "scenario": scenario.to_json(), "source": label, "from_profile": reused, "layers": rows,
            "outside_layers": {key: outside[key] for key in (*TIME_KEYS, *SIZE_KEYS)},
            "total": total}


def from_profile(profiled: dict | None, blocks: dict, target: Target, scenario: Scenario) -> bool:
    """Whether a profile's costs (``costs.json``) can stand for measuring ``blocks`` ((kind, name) -> variant):
    taken for ``target`` in ``scenario``, with a cost for every one of them."""
    return bool(profiled) and profiled["target"] == target.name and profiled["scenario"] == scenario.to_json() \
        and all(name in profiled[kind] for kind, name in blocks)


def print_estimate(result: dict) -> None:
    """The per-layer table and the whole-model line, on stdout."""
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"{result['model']} on {result['target']}: {result['source']['summary']}")
    for column in ("layer", "attention", "ffn", "attention ms", "ffn ms", "prefill ms", "decode ms", "params"):
        table.add_column(column, justify="left" if column in ("attention", "ffn") else "right")
    for r in result["layers"]:
        table.add_row(str(r["layer"]), r["attention"], r["ffn"], f"{r['attention_ms']:.3f}", f"{r['ffn_ms']:.3f}",
                      f"{r['prefill_ms']:.3f}", f"{r['decode_ms']:.3f}", f"{r['num_params'] / 1e6:.1f}M")
    console.print(table)
    t, s = result["total"], result["scenario"]
    fits = "" if "fits_in_memory" not in t else ("  (fits)" if t["fits_in_memory"] else "  (does NOT fit)")
    console.print(
        f"whole model, batch {s['batch']}, {s['input_len']}/{s['output_len']} tokens, {s['dtype']} "
        f"(KV {s['kv_dtype']}): runtime {t['runtime_ms']:.1f} ms, time to first token {t['ttft_ms']:.1f} ms, "
        f"{Scenario.tokens_per_s_text(t['tokens_per_s'])} tokens/s, {t['num_params'] / 1e9:.3f}B parameters, "
        f"memory {t['memory_mib'] / 1024:.2f} GiB{fits} (KV cache {t['kv_cache_mib']:,.0f} MiB)")
    if result["source"]["kind"] == "estimated":
        console.print(f"[dim]estimated, {result['source']['reason']}[/dim]")
