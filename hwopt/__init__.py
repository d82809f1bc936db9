"""hwopt: hardware-aware optimisation of LLMs by the Puzzle method.

The public API is small: ``load_model(name_or_path)`` returns a model whose
forward returns an object with ``.logits`` and whose ``generate()`` is
transformers'; the passes live in ``hwopt.passes`` and the command line in
``hwopt.cli``. ``register_with_transformers()`` (also done by loading any
model through hwopt) registers the nemotron-nas classes with transformers'
Auto classes, so that ``AutoModelForCausalLM.from_pretrained`` loads a child
without remote code.

Importing ``hwopt`` itself imports neither torch nor transformers, so that
``hwopt --help`` starts at once: both functions are imported on first use.
"""

from hwopt.hookspecs import hookimpl

__all__ = ["hookimpl", "load_model", "register_with_transformers"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_model":
        from hwopt.model_source import load_model

        return load_model
    if name == "register_with_transformers":
        from hwopt.lowering.transformers_code import register_with_transformers

        return register_with_transformers
    raise AttributeError(f"module 'hwopt' has no attribute {name!r}")
