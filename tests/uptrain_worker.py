"""Run by tests/test_scale.py under torchrun (or alone): uptrain a perturbed tiny parent towards the parent and
write the trained child's weights, whole, to ``OUT`` (rank 0).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/uptrain_worker.py ddp|fsdp OUT
"""

from __future__ import annotations

import sys

import torch
from conftest import tiny_parent

from hwopt.distributed import ranks
from hwopt.passes.uptrain import UptrainSettings, full_weights, uptrain

SEQUENCES_PER_STEP = 4  # all ranks together


def tiny_pair():
    """(child, parent): the tiny parent, and a copy of it with noise on every weight."""
    parent, child = tiny_parent(64, 97), tiny_parent(64, 97)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in child.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
    return child, parent


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, heldout) token ids: 12 and 4 sequences of 16."""
    ids = torch.randint(0, 97, (16, 16), generator=torch.Generator().manual_seed(2))
    return ids[:12], ids[12:]


def run(sharding: str) -> tuple[dict, dict]:
    """Uptrain the pair on this process's ranks; the stats, and the weights (whole on rank 0, else empty)."""
    child, parent = tiny_pair()
    job = ranks()
    settings = UptrainSettings(tokens=12 * 16, batch_sequences=SEQUENCES_PER_STEP // job.world, lr=1e-3)
    stats = uptrain(child, parent, *data(), settings, ranks=job, sharded=sharding == "fsdp")
    return stats, full_weights(child)


if __name__ == "__main__":
    stats, weights = run(sys.argv[1])
    if ranks().is_main:
        torch.save({"stats": stats, "weights": weights}, sys.argv[2])
