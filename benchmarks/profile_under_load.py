"""Does the profile hold on a busy machine? The same profile quiet, with one core kept busy, and with all of them.

Each condition runs ``hwopt profile`` as a new user would (a fresh run
directory, so the run chooses its own thread count) while that many
background processes run a plain busy loop. For every variant the table
gives its cost (runtime_ms) relative to the parent's own block of its kind
(SmolLM2: kv3 for attention, ffn1536 for FFN) and how far that ratio moved
from the quiet one, and for each condition what the profile said about
itself. Last, all cores busy again with ``--max-spread``: how the command
ends.

Goals: one core busy: every ratio within 15% of quiet. All cores busy: the
same, or the profile says in one line that the machine is too busy, and
``--max-spread`` makes that an error. Never a silent table off by more than
15%. "Quiet" means no busy loop of ours: on a shared machine other jobs may
be running, and the profile's own report of the load says so.

    python benchmarks/profile_under_load.py [--model smollm2-135m] [--scenario 128/64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hwopt.model_source import resolve_model
from hwopt.profiling import model_variants
from hwopt.timing import usable_cores

REPO = Path(__file__).resolve().parents[1]
GOAL = 0.15


def run_profile(workdir: Path, busy: int, args, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    """``hwopt profile`` in a fresh run directory while ``busy`` busy-loop processes run; (process, seconds)."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(1.0)  # let them settle before the run chooses its threads
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "hwopt", "profile", "--workdir", str(workdir), "--target", "cpu",
                               "--model", args.model, "--scenario", args.scenario, "--repeats", str(args.repeats),
                               *extra], capture_output=True, text=True, env=env, cwd=REPO)
        return proc, time.perf_counter() - start
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def relative_costs(costs: dict, parent: tuple[str, str]) -> dict[str, float]:
    """Each variant's runtime relative to the parent's own block of its kind."""
    out = {}
    for kind, parent_name in zip(("attention", "ffn"), parent):
        base = costs[kind][parent_name]["runtime_ms"]
        out |= {name: entry["runtime_ms"] / base for name, entry in costs[kind].items()}
    return out


def said(proc: subprocess.CompletedProcess) -> list[str]:
    """What the command said about its threads, its checks and any failure (the lines, as printed)."""
    keep = ("threads:", "profile: ", "hwopt: error")
    return [line.strip() for line in proc.stderr.splitlines() if line.strip().startswith(keep)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--scenario", default="128/64")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per profile (more while noisy)")
    parser.add_argument("--max-spread", default="0.1", help="the bound of the last run (all cores busy)")
    args = parser.parse_args()

    cores = len(usable_cores())
    parent = model_variants(resolve_model(args.model))[0]
    conditions = {"quiet": 0, "1 core busy": 1, f"{cores} cores busy": cores}
    ratios, flagged, others = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="hwopt-under-load-") as tmp:
        for name, busy in conditions.items():
            proc, seconds = run_profile(Path(tmp) / name.replace(" ", "-"), busy, args)
            print(f"--- {name} ({busy} busy loops), hwopt profile took {seconds:.0f} s, exit {proc.returncode}",
                  flush=True)
            for line in said(proc):
                print(f"    {line}")
            if proc.returncode != 0:
                sys.exit(f"hwopt profile failed:\n{proc.stderr[-3000:]}")
            costs = json.loads((Path(tmp) / name.replace(" ", "-") / "profile/costs.json").read_text())
            ratios[name] = relative_costs(costs, parent)
            flagged[name] = costs["checks"]["problems"]
            others[name] = costs["checks"]["other_busy_cores"] - busy  # beyond our own busy loops
            parent_ms = [costs[kind][p]["runtime_ms"] for kind, p in zip(("attention", "ffn"), parent)]
            print(f"    parent blocks: {parent[0]} {parent_ms[0]:.1f} ms, {parent[1]} {parent_ms[1]:.1f} ms",
                  flush=True)

        busy_name = f"{cores} cores busy"
        strict, _ = run_profile(Path(tmp) / "strict", cores, args, "--max-spread", args.max_spread)

    names = list(conditions)
    print(f"\n{args.model}, scenario {args.scenario}: runtime relative to the parent's own block "
          f"({' / '.join(parent)}), and the change from quiet")
    print(f"{'variant':<16}" + "".join(f"{n:>14}{'vs quiet':>10}" for n in names))
    worst = dict.fromkeys(names, 0.0)
    for variant, quiet in ratios["quiet"].items():
        line = f"{variant:<16}"
        for n in names:
            change = ratios[n][variant] / quiet - 1 if quiet else 0.0
            worst[n] = max(worst[n], abs(change))
            line += f"{ratios[n][variant]:>14.3f}{change:>+10.1%}"
        print(line)
    print()
    for n in names[1:]:
        verdict = "within" if worst[n] <= GOAL else "OFF BY MORE THAN"
        flag = f"flagged: {flagged[n][0]}" if flagged[n] else "not flagged"
        silent = " -- a SILENT table off by more than 15%" if worst[n] > GOAL and not flagged[n] else ""
        print(f"{n}: largest change {worst[n]:.1%} ({verdict} {GOAL:.0%} of quiet); {flag}{silent}")
    print(f"{busy_name} with --max-spread {args.max_spread}: exit {strict.returncode}; "
          + (said(strict)[-1] if said(strict) else "(said nothing)"))
    if others["quiet"] > 0.5:
        print(f"NOTE: 'quiet' was not quiet: other jobs kept {others['quiet']:.1f} cores busy, so the changes above "
              "compare one busy machine with another")


if __name__ == "__main__":
    main()
