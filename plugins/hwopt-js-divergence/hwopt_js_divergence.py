"""An example hwopt plugin: the Jensen-Shannon divergence as a replace-1-block score.

Puzzle scores each candidate block by how far the child's next-token
distribution moves from the parent's; hwopt's built-in score is
KL(teacher || student). The Jensen-Shannon divergence is an alternative:
it is symmetric and bounded by ln 2 nats, so a block that wrecks the output
scores at most ln 2 instead of an unbounded KL that can swamp the rest.

Installed, it is found through the ``hwopt`` entry-point group and registered
through the same hook the built-in metrics use.
"""

import math

import torch

import hwopt

LN2 = math.log(2.0)


def js_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of JS(P || Q) in nats, with P, Q the softmax of each row.

    Computed in log space: log M = logsumexp(log P, log Q) - ln 2, then
    JS = (KL(P || M) + KL(Q || M)) / 2, so tiny probabilities do not
    underflow; tokens with probability exactly 0 (logits of -inf) add 0.
    """
    log_p = torch.log_softmax(student_logits.float(), dim=-1)
    log_q = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - LN2
    kl_pm = _kl_to_mixture(log_p, log_m)
    kl_qm = _kl_to_mixture(log_q, log_m)
    js = 0.5 * (kl_pm + kl_qm)
    # Only rounding can leave [0, ln 2]; clamp in float64, since float32(ln 2) is above ln 2.
    return js.double().clamp(0.0, LN2).reshape(-1).mean()


def _kl_to_mixture(log_p: torch.Tensor, log_m: torch.Tensor) -> torch.Tensor:
    """KL(P || M) per row; 0 * log 0 counts as 0 (M > 0 wherever P > 0)."""
    terms = log_p.exp() * (log_p - log_m)
    return torch.where(torch.isneginf(log_p), torch.zeros_like(terms), terms).sum(-1)


class JensenShannonDivergence:
    """Lower is better: 0 when the child predicts exactly what the parent does, ln 2 at most."""

    name = "js_div"
    higher_is_better = False

    def compute(self, student, teacher) -> float:
        """``student`` and ``teacher`` are ``hwopt.metric.Outputs``; only their logits matter here."""
        return js_divergence(student.logits, teacher.logits).item()


@hwopt.hookimpl
def hwopt_register_metrics(register):
    register(JensenShannonDivergence())
