"""A child against its parent, as a table (``hwopt optimize``) and as ``report.md`` (``hwopt evaluate``).

Predicted runtime comes from the profile (the sum of block costs) or, for
``hwopt evaluate``, from the target's cost model; measured runtime times both
whole models generating in the same scenario on this machine (see
``hwopt.evaluate``). Quality is on each held-out text set: the run's own
(the corpus's last tenth) and general English (``hwopt.data``).
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from hwopt.evaluate import evaluate
from hwopt.pipeline import atomic_write_text
from hwopt.progress import console
from hwopt.search_space import Scenario

TEXT_LABELS = {"heldout": "run's own held-out text", "general": "general English (never trained on)"}


def measured_here() -> str:
    """This machine, as measured figures name it."""
    import torch

    from hwopt.hardware import resolve_target

    return f"{resolve_target('cpu').description} (torch {torch.__version__}, wall clock)"


def build_report(parent, child, solutions: dict, scenario: Scenario, texts: dict, device: str,
                 task=None) -> dict:
    """``hwopt.evaluate.evaluate`` of the child, with the profile's predicted runtimes and memory."""
    report = evaluate(child, parent, texts, scenario, task)
    report["measured_on"] = device
    totals = {"parent": solutions["parent"]["totals"], "child": solutions["solutions"][0]["totals"]}
    for role in ("parent", "child"):
        report[role]["memory_mib_predicted"] = totals[role]["stats.memory_mib"]
        report[role]["runtime_ms_predicted"] = totals[role]["stats.runtime_ms"]
    report["predicted_speedup"] = report["parent"]["runtime_ms_predicted"] / report["child"]["runtime_ms_predicted"]
    return report


def report_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(figure, parent, child, child / parent) rows for the table and ``report.md``."""
    p, c = report["parent"], report["child"]
    rows = [("parameters", f"{p['params']:,}", f"{c['params']:,}", f"{c['params'] / p['params']:.3f}")]
    for label, key, fmt in (("memory (MiB, weights + KV)", "memory_mib", "{:.1f}"),
                            ("runtime predicted (ms)", "runtime_ms_predicted", "{:.1f}"),
                            ("runtime measured (ms)", "runtime_ms_measured", "{:.1f}"),
                            ("tokens/s measured", "tokens_per_s", "{:.0f}"),
                            ("task accuracy", "task_accuracy", "{:.3f}")):
        if key in p:
            rows.append((label, fmt.format(p[key]), fmt.format(c[key]), f"{c[key] / p[key]:.3f}" if p[key] else ""))
    for name, q in report["texts"].items():
        where = TEXT_LABELS.get(name, name)
        rows.append((f"KL from parent ({where})", "0", f"{q['kl_div']:.4f}", ""))
        rows.append((f"top-1 agreement ({where})", "1", f"{q['top1_agreement']:.3f}", ""))
        rows.append((f"perplexity ({where})", f"{q['parent_perplexity']:.2f}", f"{q['perplexity']:.2f}",
                     f"{q['perplexity'] / q['parent_perplexity']:.3f}"))
    return rows


def speedup_line(report: dict) -> str:
    predicted = f"predicted {report['predicted_speedup']:.2f}x, " if "predicted_speedup" in report else ""
    return f"speedup: {predicted}measured {report['measured_speedup']:.2f}x on {report['measured_on']}"


def title(report: dict) -> str:
    s = report["scenario"]
    return f"parent vs child (batch {s['batch']}, {s['input_len']}/{s['output_len']} tokens, {s['dtype']})"


def print_report(report: dict) -> None:
    table = Table(title=title(report))
    for col in ("", "parent", "child", "child / parent"):
        table.add_column(col, justify="right")
    for row in report_rows(report):
        table.add_row(*row)
    console.print(table)
    console.print(speedup_line(report))


def write_markdown(report: dict, path: Path, picture: str | None, heading: str) -> None:
    """``report.md``: the table, the speedup line and, if given, the per-layer picture beside it."""
    lines = [f"# {heading}", "", f"{title(report)}; measured on {report['measured_on']}.", "",
             "| | parent | child | child / parent |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {' | '.join(row)} |" for row in report_rows(report)]
    lines += ["", speedup_line(report) + "."]
    for name, q in report["texts"].items():
        lines.append(f"- {TEXT_LABELS.get(name, name)}: {q['tokens']} tokens from {q.get('source', name)}")
    if picture:
        lines += ["", f"![what each layer became, and its runtime against the parent's]({picture})"]
    atomic_write_text(path, "\n".join(lines) + "\n")
