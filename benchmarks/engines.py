"""Parent against child in three engines on this CPU: eager torch, ONNX Runtime and AOTInductor, in one run.

    python benchmarks/engines.py [--child runs/demo/lower/nemotron-nas] [--scenario 64/32]
        [--engines eager,onnxruntime,aoti]

The parent is SmolLM2-135M's architecture. The child is the given
nemotron-nas checkpoint, or else a demo child assembled from SmolLM2's config
(every third layer's attention linear, every fifth's removed, odd layers' FFN
at half width). Without --child both models have random weights: the time of
a forward does not depend on their values. Each engine generates greedily
(a prefill of the prompt, then one step per new token, with its KV cache);
tokens/s counts the new tokens of the whole batch; median of --repeats runs.
Prints tokens/s per model and engine and the child/parent ratio per engine.
Measured on this machine's CPU only.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hwopt.builtin.model_names import smollm2_config
from hwopt.lowering.aoti import empty_past, export_aoti, run_aoti_step
from hwopt.lowering.onnx_kv import OnnxRuntimeModel, export_onnx
from hwopt.model.checkpoint import load_checkpoint
from hwopt.model.config import AttentionConfig, BlockConfig, FFNConfig, parent_block_config
from hwopt.model.modeling import HeteroLlamaForCausalLM, greedy_tokens
from hwopt.plugins import block_types
from hwopt.search_space import Scenario


def demo_child_blocks(config) -> list[BlockConfig]:
    parent = parent_block_config(config)
    blocks = []
    for i in range(config.num_hidden_layers):
        attention = (AttentionConfig(no_op=True) if i % 5 == 4 else
                     AttentionConfig(replace_with_linear=True) if i % 3 == 2 else parent.attention)
        ffn = FFNConfig(intermediate_size=config.intermediate_size // 2) if i % 2 else parent.ffn
        blocks.append(BlockConfig(attention, ffn))
    return blocks


def aoti_tokens(runner, model, prompts, new_tokens: int):
    logits, past = run_aoti_step(runner, prompts, empty_past(model, prompts.shape[0]), 0)
    tokens, cached = [logits[:, -1:].argmax(-1)], prompts.shape[1]
    for _ in range(new_tokens - 1):
        logits, past = run_aoti_step(runner, tokens[-1], past, cached)
        cached += 1
        tokens.append(logits[:, -1:].argmax(-1))
    return torch.cat(tokens, dim=1)


def engines_of(model, names: list[str], directory: Path) -> dict:
    """A ``generate(prompts, new_tokens)`` per engine name."""
    out = {}
    if "eager" in names:
        out["eager"] = lambda prompts, n: greedy_tokens(model, prompts, n)
    if "onnxruntime" in names:
        session = OnnxRuntimeModel(export_onnx(model, directory / "model.onnx"))
        out["onnxruntime"] = lambda prompts, n: session.greedy_tokens(prompts.numpy(), n)
    if "aoti" in names:
        runner = torch._inductor.aoti_load_package(str(export_aoti(model, directory / "model.cpu.pt2")))
        out["aoti"] = lambda prompts, n: aoti_tokens(runner, model, prompts, n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", type=Path, help="a nemotron-nas checkpoint (default: the demo child, random)")
    parser.add_argument("--scenario", default="64/32", help="PROMPT/NEW tokens (default 64/32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--engines", default="eager,onnxruntime,aoti")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = smollm2_config().transformers()
    types = block_types()
    parent = HeteroLlamaForCausalLM(config, [parent_block_config(config)] * config.num_hidden_layers, types).eval()
    child = (load_checkpoint(args.child, types) if args.child
             else HeteroLlamaForCausalLM(config, demo_child_blocks(config), types)).eval()
    scenario = Scenario.parse(args.scenario, args.batch)
    prompts = torch.randint(0, config.vocab_size, (scenario.batch, scenario.input_len))
    names = args.engines.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU only; scenario {scenario.describe()}; "
          f"parent {parent.num_parameters():,} params, child {child.num_parameters():,} "
          f"({'from ' + str(args.child) if args.child else 'demo child, random weights'})")
    tokens_per_s = {}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        runs = {}
        for role, model in (("parent", parent), ("child", child)):
            (Path(tmp) / role).mkdir()
            for engine, generate in engines_of(model, names, Path(tmp) / role).items():
                runs[role, engine] = generate
        for generate in runs.values():  # warm-up
            generate(prompts, 2)
        times = {key: [] for key in runs}
        for _ in range(args.repeats):  # interleaved, so that drift affects all alike
            for key, generate in runs.items():
                start = time.perf_counter()
                generate(prompts, scenario.output_len)
                times[key].append(time.perf_counter() - start)
        for key, t in times.items():
            tokens_per_s[key] = scenario.batch * scenario.output_len / statistics.median(t)
    print(f"{'engine':<12} {'parent tok/s':>12} {'child tok/s':>12} {'child/parent':>12}")
    for engine in names:
        p, c = tokens_per_s["parent", engine], tokens_per_s["child", engine]
        print(f"{engine:<12} {p:>12.1f} {c:>12.1f} {c / p:>11.2f}x")


if __name__ == "__main__":
    main()
