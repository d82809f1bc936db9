"""The closing comparison of parent and child, as ``report.json`` and a table.

Predicted runtime comes from the profile (the sum of block costs); measured
runtime times both whole models generating in the same scenario on this
machine, alternating between them so that drift affects both alike. KL
divergence (from the parent) and perplexity are on held-out text.
"""

from __future__ import annotations

import statistics
import time

import torch
from rich.table import Table

from hwopt.evaluate import compare_on_heldout
from hwopt.model.modeling import HeteroLlamaForCausalLM, greedy_tokens
from hwopt.progress import console
from hwopt.search_space import Scenario


def measure_runtimes(models: dict[str, HeteroLlamaForCausalLM], scenario: Scenario, vocab_size: int,
                     repeats: int = 3) -> dict[str, float]:
    """Median wall-clock ms of a full generation for each model, runs interleaved."""
    torch.manual_seed(0)
    prompts = torch.randint(0, vocab_size, (scenario.batch, scenario.input_len))
    for model in models.values():  # warm-up
        greedy_tokens(model, prompts, 2)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            greedy_tokens(model, prompts, scenario.output_len)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def build_report(parent, child, solutions: dict, scenario: Scenario, heldout_ids, device: str) -> dict:
    measured = measure_runtimes({"parent": parent, "child": child}, scenario, parent.config.vocab_size)
    totals = {"parent": solutions["parent"]["totals"], "child": solutions["solutions"][0]["totals"]}
    quality = compare_on_heldout(child, parent, heldout_ids)
    heldout = {"parent": {"kl_div": 0.0, "perplexity": quality["parent_perplexity"]},
               "child": {"kl_div": quality["kl_div"], "perplexity": quality["perplexity"]}}
    report = {"scenario": scenario.to_json(), "measured_on": device}
    for name, model in (("parent", parent), ("child", child)):
        report[name] = {
            "params": model.num_parameters(),
            "memory_mib": totals[name]["stats.memory_mib"],
            "runtime_ms_predicted": totals[name]["stats.runtime_ms"],
            "runtime_ms_measured": measured[name],
            **heldout[name],
        }
    report["predicted_speedup"] = report["parent"]["runtime_ms_predicted"] / report["child"]["runtime_ms_predicted"]
    report["measured_speedup"] = report["parent"]["runtime_ms_measured"] / report["child"]["runtime_ms_measured"]
    return report


def print_report(report: dict) -> None:
    p, c = report["parent"], report["child"]
    s = report["scenario"]
    title = f"parent vs child (batch {s['batch']}, {s['input_len']}/{s['output_len']} tokens, {s['dtype']})"
    table = Table(title=title)
    for col in ("", "parent", "child", "child / parent"):
        table.add_column(col, justify="right")
    rows = [("parameters", "params", "{:,.0f}"), ("memory (MiB, weights + KV)", "memory_mib", "{:.1f}"),
            ("runtime predicted (ms)", "runtime_ms_predicted", "{:.1f}"),
            ("runtime measured (ms)", "runtime_ms_measured", "{:.1f}"),
            ("KL from parent (held-out)", "kl_div", "{:.4f}"), ("perplexity (held-out)", "perplexity", "{:.2f}")]
    for label, key, fmt in rows:
        ratio = f"{c[key] / p[key]:.3f}" if p[key] else ""
        table.add_row(label, fmt.format(p[key]), fmt.format(c[key]), ratio)
    console.print(table)
    console.print(f"speedup: predicted {report['predicted_speedup']:.2f}x, "
                  f"measured {report['measured_speedup']:.2f}x on {report['measured_on']}")
