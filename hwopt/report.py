"""A child against its parent, as a table (``hwopt optimize``) and as ``report.md`` (``hwopt evaluate``).

Predicted runtime comes from the profile (the sum of block costs) or, for
``hwopt evaluate``, from the target's cost model; measured runtime times both
whole models generating in the same scenario on this machine (see
``hwopt.evaluate``); where the two do not fit together (``whole_plan``),
neither is timed and quality is computed a layer at a time. Quality is on
each held-out text set: the run's own (the corpus's last tenth) and general
English (``hwopt.data``).
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from hwopt.devices import Placement
from hwopt.evaluate import COMPARISON_BATCH, evaluate
from hwopt.memory_plan import MemoryPlan, report_plan
from hwopt.pipeline import atomic_write_text
from hwopt.progress import console
from hwopt.search_space import Scenario

TEXT_LABELS = {"heldout": "run's own held-out text", "general": "general English (never trained on)"}


def whole_plan(child, parent, scenario: Scenario, seq_len: int, placement: Placement, max_memory: str | None,
               device_memory: int | None) -> tuple[MemoryPlan, str | None]:
    """The memory plan of timing and comparing ``child`` and ``parent`` (``LayerwiseParent``s: nothing read yet)
    whole on ``placement`` (``report_plan``, held-out sequences of ``seq_len`` tokens), and why they are not:
    None when the plan fits ``max_memory`` (``--max-memory``, host bytes) and ``device_memory`` (the GPU's bytes,
    None on the CPU), else the plan's line of what it is over, and that quality is then computed a layer at a
    time (``evaluate``'s ``not_measured``)."""
    plan = report_plan(parent, child, scenario, COMPARISON_BATCH, seq_len, placement)
    problem = plan.over(max_memory, device_memory)
    return plan, problem and f"{problem}; quality computed a layer at a time"


def plan_text(plan: MemoryPlan, not_measured: str | None) -> str:
    """What is printed before the comparison starts: the plan, and the route taken when it does not fit."""
    route = f"\nruntime not measured: {not_measured}" if not_measured else ""
    return "\n".join(plan.lines(1)) + route


def build_report(parent, child, solutions: dict, scenario: Scenario, texts: dict, placement: Placement, target,
                 task=None, not_measured: str | None = None) -> dict:
    """``hwopt.evaluate.evaluate`` of the child (run where ``placement`` says), with the profile's predicted
    runtimes and memory for ``target``; says whether the measurement is of the target. ``not_measured``: why the
    two are ``LayerwiseParent``s, compared a layer at a time and not timed (``whole_plan``)."""
    report = evaluate(child, parent, texts, scenario, task, not_measured=not_measured)
    label_measurement(report, placement, target)
    report["predicted_on"] = target.name
    totals = {"parent": solutions["parent"]["totals"], "child": solutions["solutions"][0]["totals"]}
    for role in ("parent", "child"):
        report[role]["memory_mib_predicted"] = totals[role]["stats.memory_mib"]
        report[role]["runtime_ms_predicted"] = totals[role]["stats.runtime_ms"]
    report["predicted_speedup"] = report["parent"]["runtime_ms_predicted"] / report["child"]["runtime_ms_predicted"]
    if "selection" in solutions:  # solve chose among candidate children (hwopt.selection)
        report["child_candidate"] = {"name": solutions["solutions"][0]["candidate"],
                                     "validation_kl": solutions["selection"]["candidates"]}
    return report


def candidate_line(report: dict) -> str | None:
    """Which of solve's candidate children this is, and each one's validation KL; None where solve chose none."""
    if "child_candidate" not in report:
        return None
    chosen = report["child_candidate"]
    kls = ", ".join(f"{name} {kl:.4f}" for name, kl in chosen["validation_kl"].items())
    return f"the child is solve's {chosen['name']} candidate, kept for its KL on validation English ({kls})"


def label_measurement(report: dict, placement: Placement, target) -> None:
    """Record where the measured figures come from, and whether that is ``target``: the quality figures alone,
    computed a layer at a time, where nothing was timed (``runtime_not_measured``)."""
    import torch

    timed = "quality only, nothing timed" if "runtime_not_measured" in report else "wall clock"
    report["measured_on"] = f"{placement.describe()}, torch {torch.__version__}, {timed}"
    report["measured_on_target"] = placement.runs_on(target)


def report_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(figure, parent, child, child / parent) rows for the table and ``report.md``."""
    p, c = report["parent"], report["child"]
    rows = [("parameters", f"{p['params']:,}", f"{c['params']:,}", f"{c['params'] / p['params']:.3f}")]
    here = "" if report.get("measured_on_target", True) else " here"
    for label, key, fmt in (("memory (MiB, weights + KV)", "memory_mib", "{:.1f}".format),
                            (f"runtime predicted on {report.get('predicted_on', 'the target')} (ms)",
                             "runtime_ms_predicted", "{:.1f}".format),
                            (f"runtime measured{here} (ms)", "runtime_ms_measured", "{:.1f}".format),
                            (f"tokens/s measured{here}", "tokens_per_s", Scenario.tokens_per_s_text),
                            ("task accuracy", "task_accuracy", "{:.3f}".format)):
        if key in p:
            rows.append((label, fmt(p[key]), fmt(c[key]), f"{c[key] / p[key]:.3f}" if p[key] else ""))
        elif key == "runtime_ms_measured" and "runtime_not_measured" in report:  # why: in ``speedup_line``
            rows.append((label, "not measured", "not measured", ""))
    for name, q in report["texts"].items():
        where = TEXT_LABELS.get(name, name)
        rows.append((f"KL from parent ({where})", "0", f"{q['kl_div']:.4f}", ""))
        rows.append((f"top-1 agreement ({where})", "1", f"{q['top1_agreement']:.3f}", ""))
        rows.append((f"perplexity ({where})", f"{q['parent_perplexity']:.2f}", f"{q['perplexity']:.2f}",
                     f"{q['perplexity'] / q['parent_perplexity']:.3f}"))
    return rows


def speedup_line(report: dict) -> str:
    """The predicted and measured speedups, each with where it holds; a measurement of another machine than the
    target is said to be one, not put beside the prediction as if it checked it."""
    target = report.get("predicted_on", "the target")
    predicted = f"predicted {report['predicted_speedup']:.2f}x on {target}" if "predicted_speedup" in report else ""
    if "measured_speedup" not in report:  # parent and child compared a layer at a time
        return f"speedup: {predicted}{'; ' if predicted else ''}runtime not measured ({report['runtime_not_measured']})"
    error = f" ± {report['measured_error']:.0%}" if "measured_error" in report else ""
    measured = f"measured {report['measured_speedup']:.2f}x{error} on {report['measured_on']}"
    if report.get("measured_on_target", True):
        return f"speedup: {predicted}{', ' if predicted else ''}{measured}"
    return (f"speedup: {predicted}; {measured}, which is this machine and not {target}: the measurement does not "
            f"check the prediction")


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
    if line := candidate_line(report):
        console.print(line)
    if warning := disturbed_warning(report):
        console.print(f"[yellow]{warning}[/yellow]")


def disturbed_warning(report: dict) -> str | None:
    """What to make of a measurement taken while other processes kept this machine's cores busy; None otherwise."""
    if not report.get("measured_while_disturbed"):
        return None
    return ("warning: other processes kept this machine's cores busy while parent and child were timed: the measured "
            "speedup says more about their load than about the child; measure again on a quiet machine")


def write_markdown(report: dict, path: Path, picture: str | None, heading: str) -> None:
    """``report.md``: the table, the speedup line and, if given, the per-layer picture beside it."""
    lines = [f"# {heading}", "", f"{title(report)}; measured on {report['measured_on']}.", "",
             "| | parent | child | child / parent |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {' | '.join(row)} |" for row in report_rows(report)]
    lines += ["", speedup_line(report) + "."]
    if line := candidate_line(report):
        lines += ["", line + "."]
    if warning := disturbed_warning(report):
        lines += ["", f"**{warning}.**"]
    for name, q in report["texts"].items():
        lines.append(f"- {TEXT_LABELS.get(name, name)}: {q['tokens']} tokens from {q.get('source', name)}")
    if picture:
        lines += ["", f"![what each layer became, and its runtime against the parent's]({picture})"]
    atomic_write_text(path, "\n".join(lines) + "\n")
