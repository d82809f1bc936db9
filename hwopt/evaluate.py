"""A child against its parent on held-out text: one forward of each gives KL and both perplexities."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hwopt.metric import kl_divergence


def _next_token_loss_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()


@torch.no_grad()
def compare_on_heldout(child, parent, ids: torch.Tensor, batch: int = 4) -> dict[str, float]:
    """KL(parent || child) per token, and the perplexity of each model, on ``ids`` ([sequences, tokens])."""
    kl = child_loss = parent_loss = 0.0
    for rows in torch.split(ids, batch):
        student, teacher = child(rows).logits, parent(rows).logits
        kl += kl_divergence(student.flatten(0, 1), teacher.flatten(0, 1)).item() * len(rows)
        child_loss += _next_token_loss_sum(student, rows)
        parent_loss += _next_token_loss_sum(teacher, rows)
    predicted = ids.shape[0] * (ids.shape[1] - 1)
    return {"kl_div": kl / len(ids), "perplexity": math.exp(child_loss / predicted),
            "parent_perplexity": math.exp(parent_loss / predicted)}
