"""GGUF for llama.cpp: the nemotron-nas checkpoint converted by llama.cpp's own ``convert_hf_to_gguf.py``.

llama.cpp reads nemotron-nas (``DeciLMForCausalLM``) as its ``deci`` architecture. hwopt does not write GGUF
itself: it writes the checkpoint and runs the converter of a llama.cpp checkout (``HWOPT_LLAMA_CPP``), with its
own ``gguf-py``, in a subprocess. One thing is changed, in that process only: the converter's ``DeciModel.set_vocab``
takes the GPT-2 (byte-level BPE) path only for the Llama 3 vocabulary (``vocab_size == 128256``) and otherwise
assumes a SentencePiece-style Llama tokenizer, so a child with any other byte-level BPE tokenizer (SmolLM2's)
stops at ``gguf-py/gguf/vocab.py`` ("Cannot find Llama BPE tokenizer"). For such a tokenizer the driver takes the
converter's own GPT-2 path (``_set_vocab_gpt2``: the pre-tokenizer recognised by its hash, the merges), which is
what ``DeciModel`` does for Llama 3.

What llama.cpp's ``deci`` graph runs (``src/models/deci.cpp``), measured by ``benchmarks/gguf.py``: attention with
any number of KV heads, linear attention, no-op attention, FFNs of widths on the ``ffn_mult`` grid, and a layer with
both no-op. It has no linear FFN (the converter cannot map ``mlp.linear_mlp.weight``); a layer whose FFN alone is
no-op loses its attention too (``n_ff == 0`` skips the rest of the layer, residual included: it is written for the
"dummy" layers of Nemotron Ultra, where attention is no-op too); and a model whose last layer is no-op throughout
aborts (``GGML_ASSERT(buffer)`` in ``ggml-backend.cpp``). ``RUNTIMES["llama.cpp"]`` names such layers: lower refuses
them before writing, and solve leaves out the first two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hwopt.errors import HwoptError

ENV = "HWOPT_LLAMA_CPP"
OUTTYPES = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}  # --dtype -> the converter's --outtype

_DRIVER = r"""
import importlib, json, sys
from pathlib import Path
llama_cpp, argv = Path(sys.argv[1]), sys.argv[2:]
sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
convert = importlib.import_module("convert_hf_to_gguf")
deci = getattr(convert, "DeciModel", None) or importlib.import_module("conversion.deci").DeciModel
original = deci.set_vocab

def set_vocab(self):
    path = Path(self.dir_model) / "tokenizer.json"
    model = json.loads(path.read_text(encoding="utf-8"))["model"] if path.is_file() else {}
    if (self.hparams.get("vocab_size", 128256) != 128256 and model.get("type") == "BPE"
            and not model.get("byte_fallback", False)):
        self._set_vocab_gpt2()  # byte-level BPE other than Llama 3's: the path DeciModel takes for Llama 3
    else:
        original(self)

deci.set_vocab = set_vocab
sys.argv = ["convert_hf_to_gguf.py", *argv]
convert.main()
"""


def find_llama_cpp() -> tuple[Path | None, str]:
    """The llama.cpp checkout named by ``HWOPT_LLAMA_CPP`` (None and why not when there is none)."""
    where = os.environ.get(ENV)
    if not where:
        return None, (f"set {ENV} to a llama.cpp checkout (the directory with convert_hf_to_gguf.py and gguf-py; "
                      "llama-cpp-python's sdist has one under vendor/llama.cpp)")
    root = Path(where).expanduser()
    missing = [name for name in ("convert_hf_to_gguf.py", "gguf-py") if not (root / name).exists()]
    if missing:
        return None, f"{ENV}={where} has no {' or '.join(missing)}: it is not a llama.cpp checkout"
    return root, ""


def convert_to_gguf(checkpoint: Path, out_file: Path, llama_cpp: Path, dtype: str = "fp32",
                    timeout: float | None = None) -> Path:
    """Run llama.cpp's converter on a nemotron-nas checkpoint; HwoptError with its last lines when it fails."""
    if dtype not in OUTTYPES:
        raise HwoptError(f"gguf: --dtype {dtype} is not written by llama.cpp's converter "
                         f"(use one of {', '.join(OUTTYPES)}; quantize the f16 GGUF with llama-quantize)")
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    if config.get("architectures") != ["DeciLMForCausalLM"]:
        raise HwoptError(f"gguf: {checkpoint} is not a nemotron-nas checkpoint")
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", _DRIVER, str(llama_cpp), str(checkpoint), "--outfile", str(out_file),
           "--outtype", OUTTYPES[dtype]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not out_file.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise HwoptError(f"llama.cpp's convert_hf_to_gguf.py failed on {checkpoint}:\n{tail}")
    return out_file
