"""Deprecated: ``hwopt.targets`` (a hardware description is a target). Kept for one release.

``from hwopt.hardware import HardwareProfile`` still works (it is
``hwopt.targets.Target``), with a ``DeprecationWarning`` naming the new name.
"""

import warnings

_RENAMED = {"HardwareProfile": "Target", "shipped_profiles": "shipped_targets"}  # old name -> new


def __getattr__(name: str):
    from hwopt import targets

    new = _RENAMED.get(name, name)
    if name.startswith("_") or not hasattr(targets, new):
        raise AttributeError(f"module 'hwopt.hardware' has no attribute {name!r}")
    warnings.warn(f"hwopt.hardware.{name} is deprecated: use hwopt.targets.{new}", DeprecationWarning, stacklevel=2)
    return getattr(targets, new)
