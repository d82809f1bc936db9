"""Built-in replace-1-block scores (see ``hwopt.metric`` for what a metric is given).

``kl_div`` is Puzzle's default and ours; ``cosine`` is puzzletron's default.
The others are the alternatives both papers report: the student's own LM
loss, how often it keeps the parent's top token, and accuracy on a user's
multiple-choice task.

torch is imported where a metric is computed, so that listing the metrics
(``hwopt plugins``) or asking which way one points (``hwopt solve
--library``) imports none of it.
"""

from hwopt.hookspecs import hookimpl
from hwopt.metric import Outputs, kl_divergence


class KLDivergence:
    """KL(parent || student) of the next-token distributions, mean over tokens."""

    name = "kl_div"
    higher_is_better = False

    def compute(self, student: Outputs, teacher: Outputs) -> float:
        return kl_divergence(student.logits, teacher.logits).item()


class LMLoss:
    """The student's next-token cross-entropy on the held-out text (nats per token)."""

    name = "lm_loss"
    higher_is_better = False

    def compute(self, student: Outputs, teacher: Outputs) -> float:
        import torch.nn.functional as F

        return F.cross_entropy(student.logits.float(), student.labels, ignore_index=-100).item()


class CosineDistance:
    """1 - cosine similarity of the final hidden states (after the final norm), mean over tokens."""

    name = "cosine"
    higher_is_better = False

    def compute(self, student: Outputs, teacher: Outputs) -> float:
        import torch.nn.functional as F

        return (1 - F.cosine_similarity(student.hidden.float(), teacher.hidden.float(), dim=-1)).mean().item()


class TopKAgreement:
    """Fraction of tokens whose parent top-1 token is among the student's top ``k``."""

    higher_is_better = True

    def __init__(self, k: int):
        self.k = k
        self.name = f"top{k}_agreement"

    def compute(self, student: Outputs, teacher: Outputs) -> float:
        parent_top = teacher.logits.argmax(-1, keepdim=True)
        student_top = student.logits.topk(self.k, dim=-1).indices
        return (student_top == parent_top).any(-1).float().mean().item()


class TaskAccuracy:
    """The student's accuracy on the ``--task-data`` questions, answered by log-likelihood."""

    name = "task_accuracy"
    higher_is_better = True
    needs = ("task",)

    def compute(self, student: Outputs, teacher: Outputs) -> float:
        from hwopt.tasks import task_accuracy

        return task_accuracy(student.model, student.task)


@hookimpl
def hwopt_register_metrics(register):
    for metric in (KLDivergence(), LMLoss(), CosineDistance(), TopKAgreement(1), TopKAgreement(5), TaskAccuracy()):
        register(metric)
