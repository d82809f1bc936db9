"""Built-in lowering: the Hugging Face nemotron-nas checkpoint."""

from hwopt.hookspecs import hookimpl
from hwopt.model.checkpoint import check_ffn_mult_readers, save_nemotron_nas


class NemotronNASLowering:
    name = "nemotron-nas"
    description = "Hugging Face nemotron-nas checkpoint (DeciLMForCausalLM): config.json with block_configs"

    def lower(self, model, tokenizer, out_dir) -> None:
        check_ffn_mult_readers(model)
        save_nemotron_nas(model, out_dir, tokenizer)


@hookimpl
def hwopt_register_lowerings(register):
    register(NemotronNASLowering())
