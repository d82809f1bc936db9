"""Run by tests/test_scale.py under torchrun (or alone): uptrain a perturbed tiny parent towards the parent and
write the trained child's weights, whole, to ``OUT`` (rank 0).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/uptrain_worker.py ddp|fsdp OUT DIR

``DIR`` holds the pair as checkpoints (``save_pair``): under FSDP each rank builds both models from them on the
meta device (``hwopt.uptraining.sharded_models``), watched (``watched_build``): what it saw goes to ``OUT``
too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import tiny_parent

import hwopt.uptraining as uptrain_module
from hwopt.devices import FP32_CPU
from hwopt.distributed import ranks
from hwopt.model.checkpoint import save_nemotron_nas
from hwopt.model.layerwise import LayerwiseParent
from hwopt.plugins import block_types
from hwopt.uptraining import UptrainSettings, full_weights, uptrain

SEQUENCES_PER_STEP = 4  # all ranks together


def tiny_pair():
    """(child, parent): the tiny parent, and a copy of it with noise on every weight."""
    parent, child = tiny_parent(64, 97), tiny_parent(64, 97)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in child.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
    return child, parent


def save_pair(directory: Path) -> None:
    """``tiny_pair`` as two fp32 checkpoints, ``directory``/child and ``directory``/parent."""
    for model, name in zip(tiny_pair(), ("child", "parent"), strict=True):
        save_nemotron_nas(model, directory / name)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, heldout) token ids: 12 and 4 sequences of 16."""
    ids = torch.randint(0, 97, (16, 16), generator=torch.Generator().manual_seed(2))
    return ids[:12], ids[12:]


def watched_build(directory: Path, job) -> tuple:
    """``sharded_models`` of the checkpoints ``save_pair`` wrote, watched: (child, parent, what was seen: whether
    every module ``fully_shard`` got was still on the meta device, the most bytes of one piece read whole, and
    the bytes of this rank's shards of the child)."""
    real_shard, real_pieces = uptrain_module.fully_shard, uptrain_module.pieces
    on_meta, piece_bytes = [], []

    def fully_shard(module, **kwargs):
        on_meta.append(all(p.device.type == "meta" for p in module.parameters()))
        return real_shard(module, **kwargs)

    def pieces(source):
        for piece in real_pieces(source):
            piece_bytes.append(sum(t.numel() * t.element_size() for t in piece.values()))
            yield piece

    uptrain_module.fully_shard, uptrain_module.pieces = fully_shard, pieces
    try:
        child, parent = uptrain_module.sharded_models(
            *(LayerwiseParent(directory / name, block_types()) for name in ("child", "parent")), FP32_CPU, job)
    finally:
        uptrain_module.fully_shard, uptrain_module.pieces = real_shard, real_pieces
    shard_bytes = sum(p.to_local().numel() * p.element_size() for p in child.parameters())
    return child, parent, {"sharded_on_meta": on_meta, "piece_bytes": piece_bytes, "child_shard_bytes": shard_bytes}


def run(sharding: str, directory: Path | None = None) -> tuple[dict, dict, dict]:
    """Uptrain the pair on this process's ranks; the stats, the weights (whole on rank 0, else empty), and what
    ``watched_build`` saw (under FSDP, from the checkpoints in ``directory``)."""
    job = ranks()
    if sharding == "fsdp":
        child, parent, seen = watched_build(directory, job)
    else:
        (child, parent), seen = tiny_pair(), {}
    settings = UptrainSettings(tokens=12 * 16, batch_sequences=SEQUENCES_PER_STEP // job.world, lr=1e-3)
    stats = uptrain(child, parent, *data(), settings, ranks=job)
    return stats, full_weights(child), seen


if __name__ == "__main__":
    stats, weights, seen = run(sys.argv[1], Path(sys.argv[3]))
    if ranks().is_main:
        torch.save({"stats": stats, "weights": weights, "seen": seen}, sys.argv[2])
