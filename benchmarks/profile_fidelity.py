"""Can the profile be trusted? Predicted runtime against whole-model runtime, on this CPU.

For the SmolLM2-135M parent and several random children (each layer's
attention and FFN drawn from the search space), in each scenario:

* ``blocks``: the sum of per-block costs measured by the torch backend
  (what the profile pass writes), plus the part outside the layers;
* ``roofline``: the analytic model with this machine's measured peaks;
* ``calibrated``: the analytic model with efficiency factors fitted to the
  per-block timings of the first bullet;

each against the median wall-clock time of generating with the whole model
(``hwopt.evaluate.measure_runtimes``, models interleaved). Blocks and whole
models are measured by turns over several rounds and the medians compared,
so that the slow drift of a shared machine does not favour one side.
Goals: blocks within 5% of end to end, the roofline within 25%.

    python benchmarks/profile_fidelity.py [--children 4] [--scenario 128/64 --batch 1 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics

import torch

from hwopt.calibration import CalibrationRow
from hwopt.cpu_roof import roof_of
from hwopt.evaluate import measure_runtimes
from hwopt.model.config import BlockConfig
from hwopt.model.modeling import HeteroLlamaForCausalLM
from hwopt.model_source import resolve_model
from hwopt.plugins import block_types
from hwopt.profiling import choose_backend, layer_rows, measure_costs, model_total, profile_variants
from hwopt.search_space import Scenario, SearchSpace, model_sub_variants
from hwopt.targets import resolve_target
from hwopt.workload import scenario_phases


def predicted_ms(costs: dict, variants: list[tuple[str, str]]) -> float:
    return model_total(costs, layer_rows(costs, variants))["runtime_ms"]


def random_children(variants, num_layers: int, count: int, seed: int = 0) -> list[list[tuple]]:
    """``count`` children, each layer's attention and FFN variant drawn at random."""
    rng = random.Random(seed)
    attention = [v for v in variants if v.kind == "attention"]
    ffn = [v for v in variants if v.kind == "ffn"]
    return [[(rng.choice(attention), rng.choice(ffn)) for _ in range(num_layers)] for _ in range(count)]


def calibration_rows(costs: dict, model: str, scenario: Scenario) -> tuple[dict, ...]:
    """The profile's per-phase block timings as calibration rows (``hwopt.calibration.CalibrationRow``)."""
    pieces = [(kind, entry) for kind in ("attention", "ffn") for entry in costs[kind].values()]
    rows = []
    for kind, entry in [*pieces, ("outside_layers", costs["outside_layers"])]:
        decode = {int(context): ms for context, ms in entry["decode_step_ms"].items()}
        step_ms = {"prefill": {0: entry["prefill_ms"]}, "decode": decode}
        block = {k: v for k, v in entry.get("config", {}).items() if v is not None} or None
        for phase in scenario_phases(scenario):
            ms = step_ms[phase.name][phase.cached]
            if ms > 0:
                src = entry["source"]
                rows.append(CalibrationRow(src["device"], src["backend"], src["date"], model, kind, block,
                                           scenario.dtype, scenario.kv_dtype, phase.name, phase.batch,
                                           phase.new_tokens, phase.cached, ms).as_dict())
    return tuple(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--scenario", action="append", help="INPUT/OUTPUT (repeatable; default 128/64 and 512/32)")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable; default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="profile repeats per phase")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of (profile every block, generate once with every model); medians are reported")
    args = parser.parse_args()

    source = resolve_model(args.model)
    config, target = source.config, resolve_target("cpu")
    variants = profile_variants(source, SearchSpace())
    children = random_children(variants, config.num_hidden_layers, args.children)
    models = {"parent": model_sub_variants(source), **{f"child {i + 1}": c for i, c in enumerate(children)}}
    torch.manual_seed(0)
    built = {name: HeteroLlamaForCausalLM(config, [BlockConfig(a.config, f.config) for a, f in layers],
                                          block_types()).eval()
             for name, layers in models.items()}
    chosen = {name: [(a.name, f.name) for a, f in layers] for name, layers in models.items()}
    print(f"{args.model} on {target.description}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'scenario':<16} {'model':<9} {'e2e ms':>9} {'spread':>7} {'blocks ms':>10} {'ratio':>6} "
          f"{'roofline ms':>12} {'ratio':>6} {'calibrated ms':>14} {'ratio':>6}")
    summary = {"blocks": [], "roofline": [], "calibrated": []}
    for lengths in args.scenario or ["128/64", "512/32"]:
        for batch in args.batch or [1]:
            scenario = Scenario.parse(lengths, batch, "fp32")
            block_costs, measured_rounds = [], []
            for r in range(args.rounds):  # blocks and whole models by turns, so drift hits both alike
                backend, label = choose_backend("torch", target, scenario)
                block_costs.append(measure_costs(config, variants, target, scenario, backend, label, args.repeats,
                                                 f"blocks {lengths} x{batch}, round {r + 1}"))
                measured_rounds.append(measure_runtimes(built, scenario, config.vocab_size, repeats=1))
            roof = roof_of(target)
            rows = sum((calibration_rows(costs, args.model, scenario) for costs in block_costs), ())
            calibrated = dataclasses.replace(target, bandwidth_gbs=roof.bandwidth_gbs, peak_tflops=roof.peak_tflops,
                                             calibration=rows)
            estimates = {}
            for kind, tgt in (("roofline", target), ("calibrated", calibrated)):
                backend, label = choose_backend("roofline", tgt, scenario)
                estimates[kind] = measure_costs(config, variants, tgt, scenario, backend, label, 1, kind)
                print(f"  {lengths} x{batch}, {kind}: {label['model']}")
            for name in models:
                measured = statistics.median(m[name] for m in measured_rounds)
                predicted = {"blocks": statistics.median(predicted_ms(c, chosen[name]) for c in block_costs),
                             **{kind: predicted_ms(costs, chosen[name]) for kind, costs in estimates.items()}}
                runs = [m[name] for m in measured_rounds]
                spread = max(runs) / min(runs) - 1  # how much the same model's own time moved between rounds
                line = f"{lengths + ' x' + str(batch):<16} {name:<9} {measured:>9.1f} {spread:>7.1%}"
                for kind, width in (("blocks", 10), ("roofline", 12), ("calibrated", 14)):
                    summary[kind].append(abs(predicted[kind] / measured - 1))
                    line += f" {predicted[kind]:>{width}.1f} {predicted[kind] / measured:>6.3f}"
                print(line)
    for kind, errors in summary.items():
        print(f"{kind:<11} |predicted / measured - 1|: median {100 * statistics.median(errors):.1f}%, "
              f"max {100 * max(errors):.1f}%")


if __name__ == "__main__":
    main()
