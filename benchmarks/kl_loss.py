"""The KL loss of uptraining, plain autograd against ``hwopt.chunked_kl``, forward and backward, side by side.

    python benchmarks/kl_loss.py [--tokens 512] [--vocab 49152] [--dtype bf16] [--repeats 7]
        [--chunk-rows 16 128]

Random logits the shape of one uptraining step's (512 tokens of SmolLM2's
vocabulary, in the bf16 an uptraining step's forwards produce on a CPU with
native bf16). Prints the median seconds of each (the chunked one with each
``--chunk-rows``, default ``hwopt.chunked_kl.CHUNK_ROWS``), their ratio, the
losses' values, and how busy other processes kept the machine meanwhile: the
chunked loss gains most on a quiet machine, least where other processes'
threads compete for the cores (figures in ``hwopt.chunked_kl``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import hwopt.chunked_kl
from hwopt.devices import TRAIN_DTYPES
from hwopt.metric import kl_divergence
from hwopt.timing import CpuLoad


def plain_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """What ``hwopt.metric.kl_divergence`` was before: autograd through ``log_softmax`` and ``kl_div``."""
    return F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1), log_target=True,
                    reduction="batchmean")


def seconds(loss_fn, student: torch.Tensor, teacher: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds of one forward and backward, and the loss's value."""
    times = []
    for _ in range(repeats):
        leaf = student.clone().requires_grad_(True)
        start = time.perf_counter()
        loss = loss_fn(leaf, teacher)
        loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times), loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dtype", choices=TRAIN_DTYPES, default="bf16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunk-rows", type=int, nargs="+", default=[hwopt.chunked_kl.CHUNK_ROWS])
    args = parser.parse_args()
    torch.manual_seed(0)
    student, teacher = ((torch.randn(args.tokens, args.vocab) * 3).to(TRAIN_DTYPES[args.dtype]) for _ in range(2))
    chunked = {}
    with CpuLoad() as load:
        plain, plain_value = seconds(plain_kl, student, teacher, args.repeats)
        for rows in args.chunk_rows:
            hwopt.chunked_kl.CHUNK_ROWS = rows
            chunked[rows] = seconds(kl_divergence, student, teacher, args.repeats)
    print(f"[{args.tokens}, {args.vocab}] {args.dtype} logits, {torch.get_num_threads()} threads, forward + backward "
          f"({load.describe()}):")
    print(f"  plain autograd           {plain * 1e3:8.1f} ms   (KL {plain_value:.6f})")
    for rows, (took, value) in chunked.items():
        print(f"  chunked, {rows:>4} rows a chunk {took * 1e3:8.1f} ms   (KL {value:.6f})   plain / chunked: "
              f"{plain / took:.2f}x")

if __name__ == "__main__":
    main()
