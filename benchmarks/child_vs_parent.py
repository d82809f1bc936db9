"""Child against parent: generation time in several serving scenarios, measured in one run.

    python benchmarks/child_vs_parent.py runs/demo [--scenarios 128/64 512/64 32/256] [--batch 1 4]

Loads the run's parent (its --model) and lowered child, times a full greedy
generation of each in every scenario (runs interleaved, median of repeats),
and prints the times and the speedup. Also prints the profile's predicted
speedup for the run's own scenario, to compare prediction with measurement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hwopt.evaluate import measure_runtimes
from hwopt.model.checkpoint import load_checkpoint
from hwopt.model_source import load_model
from hwopt.plugins import block_types
from hwopt.search_space import Scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--scenarios", nargs="+", default=["128/64", "512/32", "32/128"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    settings = json.loads((args.workdir / "run.json").read_text())
    parent = load_model(settings["model"])
    child = load_checkpoint(args.workdir / "lower" / "nemotron-nas", block_types())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; parent {parent.num_parameters():,} "
          f"params, child {child.num_parameters():,}")
    print(f"{'scenario':>10} {'batch':>5} {'parent ms':>10} {'child ms':>10} {'speedup':>8}")
    for lengths in args.scenarios:
        for batch in args.batch:
            scenario = Scenario.parse(lengths, batch)
            ms = measure_runtimes({"parent": parent, "child": child}, scenario, parent.config.vocab_size, args.repeats)
            print(f"{lengths:>10} {batch:>5} {ms['parent']:>10.1f} {ms['child']:>10.1f} "
                  f"{ms['parent'] / ms['child']:>7.2f}x")
    report_path = args.workdir / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        print(f"run scenario {report['scenario']}: predicted {report['predicted_speedup']:.2f}x, "
              f"measured {report['measured_speedup']:.2f}x")


if __name__ == "__main__":
    main()
