"""Built-in lowerings: the Hugging Face nemotron-nas checkpoint (more formats in ``hwopt.lowering``).

A lowering has ``name``, ``description`` (what it writes), ``needs`` (what
must be installed or present to write it) and ``lower(model, tokenizer,
out_dir, options)`` with ``options`` a ``hwopt.passes.lower.LowerOptions``.
"""

from hwopt.hookspecs import hookimpl
from hwopt.lowering.transformers_code import TORCH_DTYPES, write_remote_code
from hwopt.model.checkpoint import save_nemotron_nas
from hwopt.progress import console


class NemotronNASLowering:
    name = "nemotron-nas"
    description = ("Hugging Face nemotron-nas checkpoint (DeciLMForCausalLM): config.json with block_configs, "
                   "safetensors in --dtype (sharded beyond 5 GB), tokenizer, and its own modeling code (auto_map) "
                   "for transformers; read by vLLM, SGLang, TensorRT-LLM, llama.cpp's converter")
    needs = "nothing beyond hwopt"

    def lower(self, model, tokenizer, out_dir, options) -> None:
        dtype = options.dtype
        if dtype not in TORCH_DTYPES:  # fp8 weights need calibrated scales, which a quantizer adds
            console.print(f"[yellow]nemotron-nas: {dtype} weights need a quantizer (TensorRT-LLM, ModelOpt); "
                          "writing bf16[/yellow]")
            dtype = "bf16"
        save_nemotron_nas(model, out_dir, tokenizer, TORCH_DTYPES[dtype])
        write_remote_code(out_dir)


@hookimpl
def hwopt_register_lowerings(register):
    register(NemotronNASLowering())
