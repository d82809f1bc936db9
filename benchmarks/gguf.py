"""GGUF through llama.cpp: does each block kind of a child convert, run, and give hwopt's logits?

For each block kind, a random child (hidden 256, 4 heads of 64, FFN 512, SmolLM2's tokenizer and vocabulary)
whose middle layer is of that kind, between two of the parent's layers (and for a few, as the last layer), is
written as a nemotron-nas checkpoint, converted by llama.cpp's ``convert_hf_to_gguf.py`` (``hwopt.lowering.gguf``,
llama.cpp from ``HWOPT_LLAMA_CPP``) and run by llama-cpp-python (``import llama_cpp``; ``LLAMA_CPP_LIB_PATH`` may
name a libllama built from that same checkout), in a child process. Its logits over a prompt are compared with
hwopt's. Then one child mixing every kind that passed goes through ``hwopt.passes.lower`` (format ``gguf``), and its
tokenization is compared with SmolLM2's too.

    HWOPT_LLAMA_CPP=.../vendor/llama.cpp LLAMA_CPP_LIB_PATH=.../vendor/llama.cpp/build/bin \
        python benchmarks/gguf.py [--dtype fp32|fp16] [--tol 1e-5]

llama.cpp runs with an f32 KV cache (its default is f16). Prints, per kind, whether it converted and the max abs
logit difference, and exits 1 when a kind that ``RUNTIMES['llama.cpp']`` accepts does not agree within
``--tol`` times the largest |logit|, or one it refuses does agree.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from hwopt.errors import HwoptError
from hwopt.lowering.gguf import convert_to_gguf, find_llama_cpp
from hwopt.lowering.runtimes import RUNTIMES
from hwopt.model.config import AttentionConfig as A
from hwopt.model.config import BlockConfig as B
from hwopt.model.config import FFNConfig as F
from hwopt.passes.lower import LowerOptions, lower
from hwopt.search_space import Scenario

PARENT = B(A(n_heads_in_group=1), F(intermediate_size=512))
KINDS = {
    "parent (MHA, FFN 512)": PARENT,
    "GQA 2 KV heads": B(A(n_heads_in_group=2), F(intermediate_size=512)),
    "GQA 1 KV head, FFN 256": B(A(n_heads_in_group=4), F(intermediate_size=256)),
    "linear attention": B(A(replace_with_linear=True), F(intermediate_size=512)),
    "no-op attention": B(A(no_op=True), F(intermediate_size=256)),
    "linear FFN": B(A(n_heads_in_group=2), F(replace_with_linear=True)),
    "no-op FFN (after attention)": B(A(n_heads_in_group=2), F(no_op=True)),
    "no-op attention and FFN": B(A(no_op=True), F(no_op=True)),
}
LAST = {  # the same kinds as the last layer, where llama.cpp picks the rows it outputs
    "linear attention, last layer": B(A(replace_with_linear=True), F(intermediate_size=512)),
    "no-op attention, last layer": B(A(no_op=True), F(intermediate_size=256)),
    "no-op attention and FFN, last": B(A(no_op=True), F(no_op=True)),
}
F32 = 0  # GGML_TYPE_F32
PROMPT = "The capital of France is Paris, and the capital of Germany is Berlin. Counting: one, two, three"


def child(blocks, seed=0, dtype="fp32"):
    """A random child; with ``dtype`` fp16 its weights are rounded to fp16 (what the GGUF holds), kept in fp32."""
    from transformers import LlamaConfig

    from hwopt.model.modeling import HeteroLlamaForCausalLM
    from hwopt.plugins import block_types

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=len(blocks), num_attention_heads=4,
                         num_key_value_heads=4, head_dim=64, vocab_size=49152, max_position_embeddings=512,
                         tie_word_embeddings=True, rope_theta=10000.0)
    model = HeteroLlamaForCausalLM(config, blocks, block_types()).eval()
    with torch.no_grad():  # norms away from 1, so that a norm read from the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        if dtype == "fp16":
            for p in model.parameters():
                p.copy_(p.half().float())
    return model


def llama_logits(gguf_path: Path, ids: list[int], prefill: int | None = None) -> np.ndarray:
    """llama.cpp's logits, evaluated in a child process (llama.cpp aborts the process on some models).

    With ``prefill``, the first ``prefill`` tokens go in one batch and each later one alone, through the KV cache.
    """
    out = gguf_path.with_suffix(".npy")
    request = json.dumps({"ids": ids, "prefill": prefill})
    done = subprocess.run([sys.executable, __file__, "--eval", str(gguf_path), request, str(out)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if "GGML_ASSERT" in line or "Error" in line]
        raise RuntimeError(f"llama.cpp exited {done.returncode}: {(lines or done.stderr.splitlines() or [''])[0]}")
    return np.load(out)


def eval_in_llama_cpp(gguf_path: Path, ids: list[int], prefill: int | None = None) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=128, n_batch=128, logits_all=True, n_threads=2, verbose=False,
                type_k=F32, type_v=F32)  # an f32 KV cache: llama.cpp defaults to f16
    llm.eval(ids[:prefill])
    for token in ids[prefill:] if prefill else []:
        llm.eval([token])  # one decode step
    out = np.array(llm.scores[:len(ids)], dtype=np.float64)
    del llm
    return out


def hwopt_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def compare(gguf_path: Path, model, ids: list[int], prefill: int | None = None) -> tuple[float, float]:
    """The max abs difference between llama.cpp's logits and hwopt's, and hwopt's max |logit|."""
    expected = hwopt_logits(model, ids)
    got = llama_logits(gguf_path, ids, prefill)
    return float(np.abs(got - expected).max()), float(np.abs(expected).max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--eval", nargs=3, metavar=("GGUF", "IDS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--tol", type=float, default=None,
                        help="max abs logit difference over max |logit| (default 1e-5 fp32, 1e-2 fp16)")
    args = parser.parse_args()
    if args.eval:
        request = json.loads(args.eval[1])
        np.save(args.eval[2], eval_in_llama_cpp(Path(args.eval[0]), request["ids"], request["prefill"]))
        return 0
    # fp32: both sides round at 6e-8 per operation; sums of up to 512 terms over a few layers stay well under 1e-5.
    # fp16: llama.cpp rounds activations to f16 (unit roundoff 4.9e-4) for its f16 matmuls; hwopt's side has the
    # same f16-rounded weights but computes in fp32.
    tol = args.tol if args.tol is not None else (1e-5 if args.dtype == "fp32" else 1e-2)
    llama_cpp, why = find_llama_cpp()
    if llama_cpp is None:
        print(f"no llama.cpp: {why}")
        return 2
    try:
        import llama_cpp as bindings
    except ImportError as e:
        print(f"no llama-cpp-python: {e}")
        return 2

    from transformers import AutoTokenizer

    from hwopt.builtin.model_names import smollm2_weights

    tokenizer = AutoTokenizer.from_pretrained(smollm2_weights())
    ids = tokenizer(PROMPT).input_ids
    print(f"llama.cpp {llama_cpp}  llama-cpp-python {bindings.__version__}  dtype {args.dtype}  "
          f"{len(ids)} tokens  tolerance {tol:g} x max |logit|")
    failed = []
    passing = []
    with tempfile.TemporaryDirectory(prefix="hwopt-gguf-") as tmp:
        tmp = Path(tmp)
        cases = [(kind, [PARENT, block, PARENT]) for kind, block in KINDS.items()]
        cases += [(kind, [PARENT, PARENT, block]) for kind, block in LAST.items()]
        for i, (kind, blocks) in enumerate(cases):
            block = blocks[1]
            model = child(blocks, seed=i, dtype=args.dtype)
            expected_ok = not RUNTIMES["llama.cpp"].problems(blocks, model.config)
            out = tmp / f"kind{i}"
            # Written for transformers (which runs every kind), so that llama.cpp is tried on all of them.
            lower(model, tokenizer, ["nemotron-nas"], out, LowerOptions(RUNTIMES["transformers"]))
            try:
                path = convert_to_gguf(out / "nemotron-nas", out / "model.gguf", llama_cpp, args.dtype)
            except HwoptError as e:
                last = str(e).strip().splitlines()[-1]
                print(f"{kind:32s} conversion failed: {last}  (hwopt refuses it: {not expected_ok})")
                if expected_ok:
                    failed.append(kind)
                continue
            try:
                diff, scale = compare(path, model, ids)
            except RuntimeError as e:
                print(f"{kind:32s} converted; {e}  (hwopt refuses it: {not expected_ok})")
                if expected_ok:
                    failed.append(kind)
                continue
            ok = diff <= tol * scale
            print(f"{kind:32s} converted; max |logit diff| {diff:.3g} (max |logit| {scale:.3g})  "
                  f"{'agrees' if ok else 'DISAGREES'}  (hwopt refuses it: {not expected_ok})")
            if ok and blocks[-1] is PARENT:
                passing.append(block)
            if ok != expected_ok:
                failed.append(kind)

        # Every kind that passed, in one child, through the gguf format itself.
        blocks = [PARENT, *passing, PARENT]
        model = child(blocks, seed=100, dtype=args.dtype)
        dtype = {"fp32": "fp32", "fp16": "fp16"}[args.dtype]
        lower(model, tokenizer, ["gguf"], tmp / "mix", LowerOptions(RUNTIMES["llama.cpp"],
                                                                     scenario=Scenario(dtype=dtype)))
        path = next((tmp / "mix" / "gguf").glob("*.gguf"))
        diff, scale = compare(path, model, ids)
        from llama_cpp import Llama

        llm = Llama(model_path=str(path), n_ctx=128, vocab_only=True, verbose=False)
        same_tokens = llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
        print(f"{'mixed child (' + str(len(blocks)) + ' layers)':32s} lower --format gguf; max |logit diff| "
              f"{diff:.3g} (max |logit| {scale:.3g})  {'agrees' if diff <= tol * scale else 'DISAGREES'}; "
              f"llama.cpp tokenizes the prompt as SmolLM2 does: {same_tokens}")
        if diff > tol * scale or not same_tokens:
            failed.append("mixed child")
        prefill = 8
        decode, _ = compare(path, model, ids, prefill)
        label = f"  prefill {prefill} + {len(ids) - prefill} decode steps"
        print(f"{label:32s} through llama.cpp's KV cache; max |logit diff| {decode:.3g}  "
              f"{'agrees' if decode <= tol * scale else 'DISAGREES'}")
        if decode > tol * scale:
            failed.append("mixed child, decoding")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
