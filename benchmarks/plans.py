"""The memory plans hwopt prints before library, score and uptrain, for a model and a machine that need not be here.

    python benchmarks/plans.py --model llama-3.1-70b --device cuda --ranks 1 8

The plans come from ``hwopt.memory_plan`` with the run's defaults (the
search space, token budgets and train dtype a pass would use), as
``hwopt optimize`` prints them when it starts each pass; nothing is
measured. ``--device cuda`` plans for the GPU of ``--target`` without
needing one here.
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import torch

from hwopt.devices import TRAIN_DTYPES, Placement
from hwopt.distributed import Ranks
from hwopt.errors import HwoptError
from hwopt.model_source import resolve_model
from hwopt.passes import uptrain as uptrain_pass
from hwopt.run import Run, Settings
from hwopt.targets import resolve_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-70b")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--train-dtype", choices=tuple(TRAIN_DTYPES))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-memory", help="host budget per rank, as --max-memory")
    parser.add_argument("--target", default="h100", help="the GPU whose memory a rank has (default h100)")
    args = parser.parse_args()
    config = resolve_model(args.model).config  # a mistyped model fails first
    settings = Settings(model=args.model, device=args.device, train_dtype=args.train_dtype,
                        max_memory=args.max_memory, distill_samples=0)
    run = Run("/nonexistent", settings)
    gpu_bytes = int(resolve_target(args.target).memory_gib * 2**30)
    torch.cuda.get_device_properties = lambda device: SimpleNamespace(total_memory=gpu_bytes)  # the planned GPU
    dtype = args.train_dtype or ("bf16" if args.device == "cuda" else "fp32")
    run.placement = Placement(torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu"),
                              TRAIN_DTYPES[dtype])  # planned for, not resolved here: the device may be elsewhere
    print(f"{args.model}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, FFN "
          f"{config.intermediate_size}, vocabulary {config.vocab_size}")
    for ranks in args.ranks:
        run.ranks = Ranks(0, ranks)  # rank 0: it holds the most layers of score
        for name in ("library", "score", "uptrain"):
            plan = run.memory_plan(name)
            if name == "uptrain" and ranks > 1:
                how = ("FSDP, each rank a shard of the child and the teacher" if uptrain_pass.sharded(run) else
                       "DDP, the whole child on every rank")
                print(f"(uptrain, --uptrain-sharding {settings.uptrain_sharding}: {how})")
            print("\n".join(plan.lines(ranks)))


if __name__ == "__main__":
    try:
        main()
    except HwoptError as exc:  # bad input: one line, as hwopt says it
        sys.exit(f"plans.py: error: {exc}")
