"""Built-in replace-1-block score: KL divergence from the parent (Puzzle's default)."""

import torch
import torch.nn.functional as F

from hwopt.hookspecs import hookimpl


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), in nats."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


class KLDivergence:
    name = "kl_div"
    higher_is_better = False

    def compute(self, student_logits, teacher_logits, labels) -> float:
        return kl_divergence(student_logits, teacher_logits).item()


@hookimpl
def hwopt_register_metrics(register):
    register(KLDivergence())
