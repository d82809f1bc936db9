"""hwopt: hardware-aware optimisation of LLMs by the Puzzle method.

The public API is small: ``load_model(name_or_path)`` returns a model whose
forward returns an object with ``.logits``; the passes live in
``hwopt.passes`` and the command line in ``hwopt.cli``.
"""

from hwopt.hookspecs import hookimpl
from hwopt.models import load_model

__all__ = ["hookimpl", "load_model"]
__version__ = "0.1.0"
