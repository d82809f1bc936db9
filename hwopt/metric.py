"""What a replace-1-block metric is, and what it is given.

The score pass runs the parent once, and the parent with one block swapped
once per (layer, variant); a metric compares the two runs. Both arrive as
``Outputs`` on the same held-out tokens. A metric that needs its own
evaluation (a task's questions, say) calls ``Outputs.model`` on its inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # torch is imported where a metric is computed, so that listing metrics needs no torch
    import torch

    from hwopt.tasks import MultipleChoice


@dataclass
class Outputs:
    """One model's run on the held-out tokens (all sequences flattened into one ``tokens`` axis)."""

    logits: torch.Tensor  # [tokens, vocab]
    hidden: torch.Tensor  # [tokens, hidden]: the last layer's output after the final norm, what the LM head reads
    labels: torch.Tensor  # [tokens]: the next token, -100 at the end of a sequence
    # token ids [sequences, length] -> logits [sequences, length, vocab]. For the student: the parent with the
    # block swapped, run from the parent's cached activations at that layer.
    model: Callable[[torch.Tensor], torch.Tensor] | None = None
    task: MultipleChoice | None = None  # the user's questions (--task-data), the same for both models


class Metric(Protocol):
    """A replace-1-block score; registered through ``hwopt_register_metrics``."""

    name: str
    higher_is_better: bool
    needs: Collection[str]  # optional: "task" when the metric reads ``Outputs.task``

    def compute(self, student: Outputs, teacher: Outputs) -> float: ...


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), in nats: a 0-d fp32 tensor, differentiable with respect to the
    student's logits. Both are [tokens, vocab]; computed a few rows at a time (``hwopt.chunked_kl``).

    Raises:
        ValueError: logits of different shapes, or not [tokens, vocab].
    """
    from hwopt.chunked_kl import ChunkedKL

    return ChunkedKL.apply(student_logits, teacher_logits)
