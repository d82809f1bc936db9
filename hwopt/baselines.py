"""The architectures Puzzle's search is compared with, built from the same library at the same budget.

- ``layer_drop``: ShortGPT (Men et al. 2024, arXiv 2403.03853): block
  influence BI_i = 1 - mean over tokens of cos(x_i, x_{i+1}), the layer's
  input and output hidden states on held-out text; the layers of lowest BI
  are removed whole until the predicted runtime meets the budget.
- ``uniform``: every layer keeps attention with the same number of KV heads
  and an FFN of the same width (Minitron-style width pruning, no layer
  removed): the widest such model (most parameters) within the budget.
- ``greedy`` and ``max_params`` are the solve pass with the greedy solver, or
  with the objective "most parameters" (Puzzle paper, Tables 11 and 12); see
  ``benchmarks/baselines.py``.

Choices are lists of (attention, FFN) variant names per layer, as
``Library.assemble`` takes them; runtimes are the profile's (``costs.json``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hwopt.errors import HwoptError

Choice = list[tuple[str, str]]
REMOVED = ("attn_noop", "ffn_noop")  # a whole layer dropped: the library's no-op attention and FFN


def predicted_runtime_ms(costs: dict, choice: Choice) -> float:
    """The profile's runtime of a whole model: outside the layers plus each layer's attention and FFN."""
    return costs["outside_layers"]["runtime_ms"] + sum(
        costs["attention"][a]["runtime_ms"] + costs["ffn"][f]["runtime_ms"] for a, f in choice)


@torch.no_grad()
def block_influence(model, ids: torch.Tensor) -> list[float]:
    """BI of every layer on ``ids`` ([sequences, tokens]): 1 - mean cosine of its input and output states."""
    hidden = model(ids, output_hidden_states=True).hidden_states
    return [(1 - F.cosine_similarity(x, y, dim=-1)).mean().item() for x, y in zip(hidden[:-1], hidden[1:])]


def layer_drop(parent_choice: Choice, influence: list[float], costs: dict, budget_ms: float,
               removed: tuple[str, str] = REMOVED,
               fits: Callable[[Choice], bool] = lambda choice: True) -> tuple[Choice, list[int]]:
    """Remove layers in order of increasing influence until the runtime is at most ``budget_ms`` and the choice
    ``fits`` (other budgets: memory, parameters).

    Returns the choice and the removed layers (in removal order). Raises ``HwoptError`` when even removing
    every layer does not meet the budgets.
    """
    def meets(choice: Choice) -> bool:
        return predicted_runtime_ms(costs, choice) <= budget_ms and fits(choice)

    choice, dropped = list(parent_choice), []
    for layer in sorted(range(len(choice)), key=lambda i: influence[i]):
        if meets(choice):
            break
        choice[layer] = removed
        dropped.append(layer)
    if not meets(choice):
        raise HwoptError(f"layer dropping cannot reach {budget_ms:.1f} ms within the other budgets")
    return choice, dropped


def uniform_width(costs: dict, num_layers: int, budget_ms: float) -> Choice:
    """The same grouped-query attention and SwiGLU width in every layer: the one with most parameters
    whose runtime is at most ``budget_ms``. Raises ``HwoptError`` when none is."""
    attention = [a for a in costs["attention"] if a.startswith("kv")]
    ffn = [f for f in costs["ffn"] if f.startswith("ffn") and f[3:].isdigit()]
    feasible = [(a, f) for a in attention for f in ffn
                if predicted_runtime_ms(costs, [(a, f)] * num_layers) <= budget_ms]
    if not feasible:
        raise HwoptError(f"no uniform width reaches {budget_ms:.1f} ms")
    best = max(feasible, key=lambda p: costs["attention"][p[0]]["num_params"] + costs["ffn"][p[1]]["num_params"])
    return [best] * num_layers
