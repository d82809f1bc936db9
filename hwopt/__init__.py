"""hwopt: hardware-aware optimisation of LLMs by the Puzzle method.

The public API is small: ``load_model(name_or_path)`` returns a model whose
forward returns an object with ``.logits`` and whose ``generate()`` is
transformers'; the passes live in ``hwopt.passes`` and the command line in
``hwopt.cli``. Importing hwopt registers the nemotron-nas classes with
transformers' Auto classes, so ``AutoModelForCausalLM.from_pretrained`` loads
a child without remote code.
"""

from hwopt.hookspecs import hookimpl
from hwopt.lowering.transformers_code import register_with_transformers
from hwopt.models import load_model

register_with_transformers()

__all__ = ["hookimpl", "load_model"]
__version__ = "0.1.0"
