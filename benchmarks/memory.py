"""Peak memory of library and score (and of sampling from the parent) against the parent's size, and their wall
time on 1 and 2 ranks.

    python benchmarks/memory.py [--dir runs/memory] [--layers 16] [--ranks 1 2]

Writes a random Llama whose fp32 weights take at least 4 GB (hidden 2048,
FFN 8192, 16 layers, SmolLM2's 49152-token vocabulary and tokenizer, untied
head: 4.7 GB) as sharded safetensors with a ``model.safetensors.index.json``,
one layer per shard, a layer at a time (never whole in memory). Then runs
``hwopt profile``, ``library`` and ``score`` on it with small token budgets,
each pass its own process, once in one process and once under ``torchrun
--nproc-per-node 2`` (gloo), and prints per pass: the peak resident set
size of the largest process (``wait4``'s ``ru_maxrss``: under torchrun,
the largest of the agent and its ranks) over the parent's weight bytes
(goal: at most 0.5), and the wall time. Last, in one process, ``hwopt
library`` again with ``--distill-samples`` on and ``--max-memory`` half the
parent's bytes, so the samples are drawn reading the parent a layer at a
time for every token (the row "library+sampling"). The machine may be
shared: say how loaded it was (``uptime``) beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig

REPO = Path(__file__).resolve().parents[1]
PASSES = ("profile", "library", "score")
BUDGETS = ["--seq-len", "32", "--bld-tokens", "256", "--score-tokens", "128", "--distill-samples", "0",
           "--kv-heads", "1", "--ffn-fractions", "0.5", "--backend", "roofline", "--scenario", "16/4"]


def layer_tensors(config: LlamaConfig, i: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Layer ``i`` of a random Llama, initialised as transformers does (normal, std ``initializer_range``)."""
    h, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    shapes = {"self_attn.q_proj": (config.num_attention_heads * head_dim, h),
              "self_attn.k_proj": (config.num_key_value_heads * head_dim, h),
              "self_attn.v_proj": (config.num_key_value_heads * head_dim, h),
              "self_attn.o_proj": (h, config.num_attention_heads * head_dim),
              "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}
    out = {f"model.layers.{i}.{name}.weight": torch.randn(shape, generator=generator) * config.initializer_range
           for name, shape in shapes.items()}
    norms = ("input_layernorm", "post_attention_layernorm")
    out |= {f"model.layers.{i}.{norm}.weight": torch.ones(h) for norm in norms}
    return out


def benchmark_config(layers: int) -> LlamaConfig:
    """The 4.7 GB parent: hidden 2048, FFN 8192, 16 layers, SmolLM2's vocabulary, untied head."""
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=16,
                       num_key_value_heads=4, head_dim=128, vocab_size=49152, max_position_embeddings=2048,
                       tie_word_embeddings=False, torch_dtype="float32")


def write_parent(directory: Path, config: LlamaConfig) -> int:
    """A random parent of ``config`` (fp32, SmolLM2's tokenizer), a shard per layer (plus one for the embedding,
    one for the norm and head), written a shard at a time; its bytes."""
    from hwopt.builtin.model_names import smollm2_weights

    layers = config.num_hidden_layers
    directory.mkdir(parents=True, exist_ok=True)
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        return json.loads(index_path.read_text())["metadata"]["total_size"]
    generator = torch.Generator().manual_seed(0)
    shards = [lambda: {"model.embed_tokens.weight": torch.randn(config.vocab_size, config.hidden_size,
                                                                 generator=generator) * config.initializer_range}]
    shards += [lambda i=i: layer_tensors(config, i, generator) for i in range(layers)]
    shards += [lambda: {"model.norm.weight": torch.ones(config.hidden_size),
                        "lm_head.weight": torch.randn(config.vocab_size, config.hidden_size,
                                                      generator=generator) * config.initializer_range}]
    weight_map, total = {}, 0
    for n, make in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = make()
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    config.save_pretrained(directory)
    AutoTokenizer.from_pretrained(smollm2_weights()).save_pretrained(directory)
    index_path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def run_pass(name: str, model: Path, workdir: Path, ranks: int, extra: tuple[str, ...] = ()
             ) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of the largest process, the first memory plan line it printed) of one pass;
    ``extra`` options after ``BUDGETS`` (the last of an option given twice wins)."""
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    launcher = [sys.executable, "-m", "hwopt"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "hwopt"]
    cmd = [*launcher, name, "--model", str(model), "--workdir", str(workdir), "--threads", threads, "--force",
           *BUDGETS, *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = workdir.parent / f"{workdir.name}.{name}.log"
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}")
    plan = next((line.strip() for line in log.read_text().splitlines() if "memory plan per rank" in line), "")
    return seconds, usage.ru_maxrss * 1024, plan


def print_row(ranks: int, name: str, seconds: float, rss: int, plan: str, parent_bytes: int) -> None:
    print(f"{ranks:>5} {name:<8} {seconds:8.1f} {rss / 1e9:12.2f} {rss / parent_bytes:13.3f}  {plan}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=REPO / "runs" / "memory")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    parent_bytes = write_parent(args.dir / "parent", benchmark_config(args.layers))
    print(f"parent: {parent_bytes / 1e9:.2f} GB of fp32 weights in {args.dir / 'parent'}; load: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'ranks':>5} {'pass':<8} {'wall s':>8} {'peak RSS GB':>12} {'RSS / parent':>13}  plan")
    for ranks in args.ranks:
        workdir = args.dir / f"run_{ranks}rank"
        for name in PASSES:
            print_row(ranks, name, *run_pass(name, args.dir / "parent", workdir, ranks), parent_bytes)
    sampling = ("--distill-samples", "256", "--max-memory", f"{parent_bytes // 2}B")  # 9 x 32 tokens, one held out
    os.environ["HWOPT_CACHE"] = str(args.dir / "sampling-cache")  # drawn anew each time, not found cached
    shutil.rmtree(args.dir / "sampling-cache", ignore_errors=True)
    print_row(1, "library+sampling", *run_pass("library", args.dir / "parent", args.dir / "run_sampling", 1, sampling),
              parent_bytes)
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
