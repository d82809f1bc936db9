"""Built-in output formats: the nemotron-nas checkpoint, ONNX with its KV cache, TensorRT engines, AOTInductor, GGUF.

A format (``hwopt.protocols.Format``, the name ``--format`` takes) has
``name``, ``description`` (what it writes), ``needs`` (what must be
installed or present to write it), optionally ``available(options) ->
(bool, reason)``, and ``lower(model, tokenizer, out_dir, options)`` with
``options`` a ``hwopt.passes.lower.LowerOptions``.

What a format writes with (torch, transformers, TensorRT) is imported in
its ``lower``, so that listing the formats imports none of it.
"""

from __future__ import annotations

from pathlib import Path

from hwopt.hookspecs import hookimpl


def weights_dtype(options, fmt: str) -> str:
    """The dtype a format is written in: ``options.dtype``, or bf16 for fp8 (which needs a quantizer's scales)."""
    from hwopt.lowering.transformers_code import TORCH_DTYPES
    from hwopt.progress import console

    if options.dtype in TORCH_DTYPES:
        return options.dtype
    console.print(f"[yellow]{fmt}: {options.dtype} weights need a quantizer (TensorRT-LLM, ModelOpt); "
                  "writing bf16[/yellow]")
    return "bf16"


def weights_torch_dtype(options, fmt: str):
    """``weights_dtype`` as a torch dtype."""
    from hwopt.lowering.transformers_code import TORCH_DTYPES

    return TORCH_DTYPES[weights_dtype(options, fmt)]


class NemotronNASFormat:
    name = "nemotron-nas"
    description = ("Hugging Face nemotron-nas checkpoint (DeciLMForCausalLM): config.json with block_configs, "
                   "safetensors in --dtype (sharded beyond 5 GB), tokenizer, and its own modeling code (auto_map) "
                   "for transformers; read by vLLM, SGLang, TensorRT-LLM, llama.cpp's converter")
    needs = "nothing beyond hwopt"
    streams = True  # written shard by shard from the checkpoint read a piece at a time, never whole

    def lower(self, model, tokenizer, out_dir, options) -> None:
        from hwopt.lowering.transformers_code import write_remote_code
        from hwopt.model.checkpoint import save_nemotron_nas

        save_nemotron_nas(model, out_dir, tokenizer, weights_torch_dtype(options, self.name))
        write_remote_code(out_dir)


class OnnxFormat:
    name = "onnx"
    description = ("model.onnx: the whole child with its KV cache in Optimum / onnxruntime-genai names "
                   "(input_ids, attention_mask, position_ids, past_key_values.{i}.key/value -> logits, "
                   "present.{i}.key/value), dynamic batch and lengths, weights in --dtype (external data beyond "
                   "2 GB), and the tokenizer")
    needs = "onnx and onnxscript (installed with hwopt); onnxruntime to run it"

    def lower(self, model, tokenizer, out_dir, options) -> None:
        import onnx

        from hwopt.lowering.onnx_kv import export_onnx

        path = export_onnx(model, Path(out_dir) / "model.onnx", weights_torch_dtype(options, self.name))
        onnx.checker.check_model(str(path))
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)


class TensorRTFormat:
    name = "tensorrt"
    description = ("<model>.<target>.<dtype>.engine built from that ONNX for the --target GPU, one optimization "
                   "profile covering --scenario and --batch, with a manifest (<engine>.json: target, NVML device "
                   "name, dtype, scenario, TensorRT version, date)")
    needs = "TensorRT 10 or 11 and the target GPU on this machine"

    def available(self, options) -> tuple[bool, str]:
        if options.target is None:
            return False, "TensorRT engines are built for a GPU --target"
        from hwopt.builtin.backend_tensorrt import TensorRTBackend

        return TensorRTBackend().available(options.target, options.scenario)

    def lower(self, model, tokenizer, out_dir, options) -> None:
        import tempfile

        from hwopt.lowering.onnx_kv import export_onnx
        from hwopt.lowering.tensorrt_engine import build_tensorrt_engine
        from hwopt.targets import nvml_gpu_name

        with tempfile.TemporaryDirectory(prefix="hwopt-trt-") as tmp:
            onnx_path = export_onnx(model, Path(tmp) / "model.onnx", weights_torch_dtype(options, self.name))
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            build_tensorrt_engine(onnx_path, out_dir, options.model_name, options.target, options.scenario,
                                  nvml_gpu_name())


class AOTInductorFormat:
    name = "aoti"
    description = ("model.<device>.pt2: torch.export + AOTInductor package for this CPU (and the GPU where torch "
                   "sees one), called as the ONNX graph is (see hwopt.lowering.aoti for its decode signature)")
    needs = "a C++ compiler (compiling takes minutes)"

    def lower(self, model, tokenizer, out_dir, options) -> None:
        import torch

        from hwopt.lowering.aoti import export_aoti

        dtype = weights_torch_dtype(options, self.name)
        for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            export_aoti(model, Path(out_dir) / f"model.{device}.pt2", device, dtype)
        model.to("cpu")


class GGUFFormat:
    name = "gguf"
    description = ("<model>.<dtype>.gguf for llama.cpp ('deci' architecture), converted from the nemotron-nas "
                   "checkpoint by llama.cpp's own convert_hf_to_gguf.py, in fp32, fp16 or bf16, with the tokenizer; "
                   "no linear FFN, and a no-op FFN only under a no-op attention (see hwopt.lowering.gguf)")
    needs = "a llama.cpp checkout named by HWOPT_LLAMA_CPP (its convert_hf_to_gguf.py and gguf-py); a tokenizer"

    def available(self, options) -> tuple[bool, str]:
        from hwopt.lowering.gguf import find_llama_cpp

        root, why = find_llama_cpp()
        return root is not None, why or f"llama.cpp at {root}"

    def lower(self, model, tokenizer, out_dir, options) -> None:
        import tempfile

        from hwopt.errors import HwoptError
        from hwopt.lowering.gguf import convert_to_gguf, find_llama_cpp
        from hwopt.lowering.runtimes import RUNTIMES, check_checkpoint
        from hwopt.lowering.transformers_code import TORCH_DTYPES
        from hwopt.model.checkpoint import save_nemotron_nas

        if tokenizer is None:
            raise HwoptError("gguf: a GGUF carries its tokenizer, and this model has none")
        check_checkpoint(RUNTIMES["llama.cpp"], model.block_configs, model.config)  # whatever --runtime says
        dtype = weights_dtype(options, self.name)
        root, _ = find_llama_cpp()
        with tempfile.TemporaryDirectory(prefix="hwopt-gguf-") as tmp:
            save_nemotron_nas(model, tmp, tokenizer, TORCH_DTYPES[dtype])
            convert_to_gguf(Path(tmp), Path(out_dir) / f"{options.model_name}.{dtype}.gguf", root, dtype)


@hookimpl
def hwopt_register_formats(register):
    for fmt in (NemotronNASFormat(), OnnxFormat(), TensorRTFormat(), AOTInductorFormat(), GGUFFormat()):
        register(fmt)
