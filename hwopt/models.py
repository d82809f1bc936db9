"""Deprecated: ``hwopt.model_source`` (where a parent's architecture and weights come from). Kept for one release.

``from hwopt.models import ModelSpec`` still works, with a ``DeprecationWarning``.
"""

import warnings


def __getattr__(name: str):
    from hwopt import model_source

    if name.startswith("_") or not hasattr(model_source, name):
        raise AttributeError(f"module 'hwopt.models' has no attribute {name!r}")
    warnings.warn(f"hwopt.models is deprecated: use hwopt.model_source.{name}", DeprecationWarning, stacklevel=2)
    return getattr(model_source, name)
