"""The uptrain pass's work (``hwopt.passes.uptrain``): the child distilled from the parent (GKD).

The loss is the Puzzle paper's best (Table 1): cosine distance between the
child's and the parent's hidden state after every layer, plus KL divergence
of the logits; no LM loss. Embeddings and the LM head stay frozen. The
uptrained weights are kept only if they lower the held-out KL divergence
from the parent; the pass records both figures either way.

Under torchrun the child trains data-parallel: with DDP every rank holds the
whole child, its gradients and AdamW state; with FSDP (``sharded_models``:
``torch.distributed.fsdp.fully_shard`` per decoder layer, then the whole
model) each rank holds 1/N of them, and the frozen teacher is sharded the
same way. Sharded models are built on the meta device and each rank reads
its shards a layer at a time, so no rank ever holds either model whole.
Both average the gradients of the ranks' sequences, so one step is the
same update as one process taking all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from hwopt.devices import FP32_CPU, Placement
from hwopt.distributed import ONE_PROCESS, Ranks
from hwopt.errors import HwoptError
from hwopt.evaluate import compare_on_heldout
from hwopt.metric import kl_divergence
from hwopt.model.checkpoint import rebuild_rotary
from hwopt.model.layerwise import pieces
from hwopt.model.modeling import HeteroLlamaForCausalLM
from hwopt.progress import progress
from hwopt.settings import default


@dataclass(frozen=True)
class UptrainSettings:
    tokens: int = default("uptrain_tokens")
    batch_sequences: int = 4
    lr: float = default("uptrain_lr")
    seed: int = default("seed")


def gkd_loss(student_out, teacher_out) -> torch.Tensor:
    """Mean cosine distance over layers' hidden states, plus KL(teacher || student) of the logits."""
    cosine = torch.stack([
        (1 - F.cosine_similarity(s, t, dim=-1)).mean()
        for s, t in zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:], strict=True)
    ]).mean()
    return cosine + kl_divergence(student_out.logits.flatten(0, 1), teacher_out.logits.flatten(0, 1))


def sharded_models(child, parent, placement: Placement, ranks: Ranks
                   ) -> tuple[HeteroLlamaForCausalLM, HeteroLlamaForCausalLM]:
    """The child (fp32 weights) and its teacher (in ``placement``'s dtype), each sharded by FSDP2 over all ranks
    (``sharded_model``) on ``placement.device``: a rank holds 1/N of each, and a layer is gathered whole only
    while it runs. ``child``, ``parent``: where their weights are read a piece at a time (see
    ``hwopt.model.layerwise.pieces``: a library's ``Child``, a ``LayerwiseParent``, or a model). On a GPU in
    bf16 the child's weights are cast to bf16 for its forward and gradients are averaged in fp32
    (``MixedPrecisionPolicy``); the teacher is already in the train dtype. Every rank must call it."""
    device = placement.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (ranks.world,))
    mixed = MixedPrecisionPolicy(param_dtype=placement.dtype, reduce_dtype=torch.float32) \
        if device.type == "cuda" and placement.dtype != torch.float32 else MixedPrecisionPolicy()
    return (sharded_model(child, torch.float32, device, mesh, mixed),
            sharded_model(parent, placement.dtype, device, mesh, MixedPrecisionPolicy()))


def sharded_model(source, dtype: torch.dtype, device: torch.device, mesh: DeviceMesh,
                  policy: MixedPrecisionPolicy) -> HeteroLlamaForCausalLM:
    """``source``'s model (see ``hwopt.model.layerwise.pieces``) sharded by FSDP2 over ``mesh``, in ``dtype`` on
    ``device``, never whole on any rank.

    It is built on the meta device, sharded (``fully_shard`` of each decoder layer, then of the whole model: the
    embedding, final norm and LM head), and only then given memory: each rank's shards (``to_empty``). The
    weights come a piece at a time: each rank reads the piece whole (one layer, or the embedding, or the norm
    and head) and keeps its own rows of every tensor (``distribute_tensor`` with ``src_data_rank=None``: no
    communication), so a rank holds its shards and one piece. The rotary tables, computed rather than stored,
    are built again on ``device``. Every rank of ``mesh`` must call it.

    Raises:
        HwoptError: the pieces do not fit the architecture (a weight missing, one it has no place for, or one
            of another shape).
    """
    with torch.device("meta"):
        model = HeteroLlamaForCausalLM(source.config, source.block_configs, source.block_types).to(dtype)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device)
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied LM head under both names
    loaded = set()
    for piece in pieces(source):
        loaded |= _keep_shards(piece, params)
        del piece  # before the next piece is read
    if missing := sorted(params.keys() - loaded):
        raise HwoptError(f"no weights read for {missing[:3]} of the model being sharded")
    rebuild_rotary(model, device)
    return model.eval()


@torch.no_grad()
def _keep_shards(piece: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter]) -> set[str]:
    """Copy this rank's rows of each whole tensor of ``piece`` into the sharded parameter of its name (in its
    dtype, on its device); returns the names. Raises HwoptError for a name ``params`` lacks, or a shape other
    than its parameter's."""
    for name, full in piece.items():
        if name not in params:
            raise HwoptError(f"weight {name} does not fit the architecture being sharded")
        param = params[name]
        if full.shape != param.shape:  # the DTensor's shape is the whole tensor's
            raise HwoptError(f"weight {name} is {tuple(full.shape)}, where the architecture being sharded has "
                             f"{tuple(param.shape)}")
        param.copy_(distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None))
    return set(piece)


def full_weights(model: HeteroLlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's state dict, whole: under FSDP gathered from every rank onto rank 0's CPU (a collective:
    every rank calls it; the others get an empty dict), else the model's own."""
    if isinstance(model, FSDPModule):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def uptrain(child: HeteroLlamaForCausalLM, parent: HeteroLlamaForCausalLM, train_ids: torch.Tensor,
            heldout_ids: torch.Tensor, settings: UptrainSettings, placement: Placement = FP32_CPU,
            ranks: Ranks = ONE_PROCESS, label: str = "uptrain (GKD)") -> dict:
    """Distil ``child`` (fp32 weights, trained under ``placement.autocast()``) in place from ``parent`` (in the
    train dtype); returns the held-out KL before and after, and what was kept.

    ``train_ids``, ``heldout_ids``: [sequences, tokens]. Under torchrun each step takes
    ``settings.batch_sequences`` sequences per rank (a final step with fewer sequences than ranks is dropped),
    and gradients are averaged over the ranks: the child is wrapped in ``DistributedDataParallel``, unless both
    models come sharded by FSDP (``sharded_models``). Read the trained weights with ``full_weights``. ``label``:
    the progress bar's.
    """
    torch.manual_seed(settings.seed)
    parent.requires_grad_(False).eval()
    child.requires_grad_(True)
    child.model.embed_tokens.requires_grad_(False)
    child.lm_head.requires_grad_(False)
    before = compare_on_heldout(child, parent, heldout_ids)["kl_div"]
    snapshot = {k: v.clone() for k, v in child.state_dict().items()}
    params = [p for p in child.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    batches = [rows for rows in torch.split(train_ids, settings.batch_sequences * ranks.world)
               if len(rows) >= ranks.world]
    steps = max(1, len(batches))
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    device = placement.device
    model = child if ranks.world == 1 or isinstance(child, FSDPModule) else DistributedDataParallel(
        child, device_ids=[device.index] if device.type == "cuda" else None)
    child.train()
    with progress(label, total=steps) as advance:
        for batch in batches:
            rows = torch.tensor_split(batch, ranks.world)[ranks.rank].to(device)
            with placement.autocast():
                with torch.no_grad():
                    teacher = parent(rows, output_hidden_states=True)
                loss = gkd_loss(model(rows, output_hidden_states=True), teacher)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            advance()
    child.eval().requires_grad_(False)
    after = compare_on_heldout(child, parent, heldout_ids)["kl_div"]
    before, after = ranks.from_main((before, after))  # every rank keeps or drops the same weights
    kept = after <= before
    if not kept:
        child.load_state_dict(snapshot)
    return {"heldout_kl_before": before, "heldout_kl_after": after, "kept_uptrained_weights": kept,
            "train_tokens": int(train_ids.numel()), "steps": steps, "ranks": ranks.world,
            "sharding": "fsdp" if isinstance(child, FSDPModule) else "ddp" if ranks.world > 1 else None}
