"""solve: one block per layer, the best score under the target's budgets.

The user's budgets are turned into constraints on the block library's
keys: ``--speedup X`` bounds the runtime by the parent's runtime / X,
``--throughput`` bounds it by the scenario's runtime at that many tokens/s,
``--memory`` bounds weights plus KV cache. Costs outside the layers
(embeddings, head) come from the profile as offsets, so budgets are on the
whole model. An infeasible budget stops with what the library can reach.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from hwopt.errors import HwoptError
from hwopt.pipeline import atomic_write_json
from hwopt.plugins import solvers
from hwopt.problem import Constraint, explain_infeasible, problem_from_library
from hwopt.search_space import Scenario

RUNTIME, MEMORY = "stats.runtime_ms", "stats.memory_mib"
_UNITS = {"b": 2**-20, "kb": 1e3 / 2**20, "kib": 2**-10, "mb": 1e6 / 2**20, "mib": 1.0,
          "gb": 1e9 / 2**20, "gib": 2**10, "tb": 1e12 / 2**20, "tib": 2**20}


def parse_memory_mib(text: str) -> float:
    """'80GB', '512 MiB', '1.5GiB' -> MiB (a bare number is MiB)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    unit = (match.group(2) or "mib").lower() if match else None
    if match is None or unit not in _UNITS:
        raise HwoptError(f"--memory takes a size such as 80GB, 512MiB or 1.5GiB, not {text!r}")
    return float(match.group(1)) * _UNITS[unit]


@dataclass(frozen=True)
class Budgets:
    speedup: float | None = None
    memory: str | None = None
    throughput: float | None = None

    def constraints(self, parent_totals: dict, scenario: Scenario) -> list[Constraint]:
        runtime_caps = []
        if self.speedup is not None:
            if self.speedup <= 0:
                raise HwoptError("--speedup must be positive")
            runtime_caps.append(parent_totals[RUNTIME] / self.speedup)
        if self.throughput is not None:
            if self.throughput <= 0:
                raise HwoptError("--throughput must be positive")
            runtime_caps.append(scenario.runtime_ms_for_throughput(self.throughput))
        out = [Constraint(RUNTIME, max=min(runtime_caps))] if runtime_caps else []
        if self.memory is not None:
            out.append(Constraint(MEMORY, max=parse_memory_mib(self.memory)))
        return out


def parent_choice(library: dict) -> dict[str, str]:
    return {layer: next(name for name, e in variants.items() if e.get("parent")) for layer, variants in library.items()}


def solve(library: dict, costs: dict, budgets: Budgets, objective: str, solver_name: str, out_path: Path,
          maximize: bool = False) -> dict:
    """Write ``solutions.json``: the chosen variant per layer, with totals next to the parent's."""
    solver = solvers().get(solver_name)
    scenario = Scenario(**costs["scenario"])
    outside = costs["outside_layers"]
    offsets = {RUNTIME: outside["runtime_ms"], MEMORY: outside["memory_mib"]}
    unconstrained = problem_from_library(library, objective, [], maximize, offsets=offsets)
    parent_totals = unconstrained.totals(parent_choice(library), (RUNTIME, MEMORY))
    problem = dataclasses.replace(unconstrained, constraints=budgets.constraints(parent_totals, scenario))
    solution = solver.solve(problem)
    if solution is None:
        reasons = "; ".join(explain_infeasible(problem, solver))
        speedup = ""
        if budgets.speedup is not None or budgets.throughput is not None:
            fastest = solver.solve(dataclasses.replace(unconstrained, objective=RUNTIME, maximize=False))
            best = parent_totals[RUNTIME] / fastest.objective
            speedup = f" (the fastest child in the library is {best:.2f}x the parent)"
        raise HwoptError(f"no architecture in the library meets the budgets: {reasons}{speedup}")
    totals = problem.totals(solution.choice, (RUNTIME, MEMORY))
    result = {
        "objective": objective,
        "maximize": maximize,
        "constraints": [c.describe() for c in problem.constraints],
        "scenario": scenario.to_json(),
        "parent": {"totals": parent_totals},
        "solutions": [{
            **solution.to_json(),
            "totals": totals,
            "predicted_speedup": parent_totals[RUNTIME] / totals[RUNTIME],
            "blocks": [library[layer][solution.choice[layer]]["block_config"] for layer in problem.layers],
            "variants": [[library[layer][solution.choice[layer]][k] for k in ("attention", "ffn")]
                         for layer in problem.layers],
        }],
    }
    atomic_write_json(out_path, result)
    return result
