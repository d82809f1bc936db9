"""hwopt: hardware-aware optimisation of LLMs by the Puzzle method.

The public API is small: ``load_model(name_or_path)`` returns a model whose
forward returns an object with ``.logits`` and whose ``generate()`` is
transformers'; the passes live in ``hwopt.passes`` and the command line in
``hwopt.cli``. Loading a model through hwopt (``hwopt.load_model``, or any
module that loads checkpoints) registers the nemotron-nas classes with
transformers' Auto classes, so ``AutoModelForCausalLM.from_pretrained`` then
loads a child without remote code.

Importing ``hwopt`` itself imports neither torch nor transformers, so that
``hwopt --help`` starts at once: ``load_model`` is imported on first use.
"""

from hwopt.hookspecs import hookimpl

__all__ = ["hookimpl", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_model":
        from hwopt.models import load_model

        return load_model
    raise AttributeError(f"module 'hwopt' has no attribute {name!r}")
