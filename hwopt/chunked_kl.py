"""KL(teacher || student) of next-token logits, a few rows at a time, its gradient computed on the way.

Over SmolLM2's 49,152-token vocabulary, the plain autograd version
(``log_softmax`` of both, ``kl_div``, then the backward of each) makes some
ten passes over [tokens, vocab] fp32 tensors too large for any cache: 0.26 s
of a 1.87 s uptraining step on 512 tokens on 2 CPU cores, and some 0.09 s
more in its backward. Here each chunk of rows is converted to fp32, reduced and
differentiated while it is in cache; the gradient with respect to the
student's logits, softmax(student) - softmax(teacher) per row, is kept for
the backward (the same idea as fused linear cross-entropy in Liger Kernel,
arXiv 2410.10989). Values and gradients equal the plain version's to fp32
rounding (``tests/test_metrics.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# rows of logits per chunk: 128 x 49,152 fp32 is 24 MiB, within the L3 cache of a server CPU. On 2 cores, fwd + bwd
# of [512, 49152] bf16 logits (`python benchmarks/kl_loss.py --chunk-rows 16 128`): quiet, 16 rows 123 ms, 128 rows
# 140 ms, plain autograd 356 ms; with two 2-thread matmul loops beside it, 16 rows 1015-1178 ms (no faster than plain,
# 1044-1088 ms), 128 rows 484-677 ms. Each chunk's operations are parallel regions that wait for any descheduled
# thread, so fewer of them hold up where the cores are shared.
CHUNK_ROWS = 128


class ChunkedKL(torch.autograd.Function):
    """``apply(student_logits, teacher_logits)``: mean over rows of KL(teacher || student) in nats, a 0-d fp32
    tensor. Both logits are [rows, vocab], any float dtype; no gradient flows to the teacher's."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
            raise ValueError(f"logits must both be [rows, vocab]; got {tuple(student_logits.shape)} and "
                             f"{tuple(teacher_logits.shape)}")
        rows = len(student_logits)
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        grad = torch.empty_like(student_logits) if ctx.needs_input_grad[0] else None
        for start in range(0, rows, CHUNK_ROWS):
            part = slice(start, start + CHUNK_ROWS)
            student = F.log_softmax(student_logits[part].float(), dim=-1)  # [chunk, vocab]
            teacher = F.log_softmax(teacher_logits[part].float(), dim=-1)  # [chunk, vocab]
            teacher_probs = teacher.exp()
            total += (teacher_probs * (teacher - student)).sum()
            if grad is not None:  # d KL / d student logits of one row: softmax(student) - softmax(teacher)
                grad[part] = student.exp_().sub_(teacher_probs)
        ctx.save_for_backward(grad)
        ctx.rows = rows
        return total / rows

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (grad,) = ctx.saved_tensors
        return grad * (grad_output / ctx.rows).to(grad.dtype), None
