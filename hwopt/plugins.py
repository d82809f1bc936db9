"""Plugin loading and the registries the hooks fill.

Built-in plugins (``hwopt.builtin.*``) and third-party ones (entry-point
group ``hwopt``) are registered the same way; each hook implementation is
called with a ``register`` callback, and every registered object is kept
with the name of the plugin that registered it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import warnings
from dataclasses import dataclass, field

import pluggy

from hwopt import hookspecs
from hwopt.errors import HwoptError

BUILTIN_PLUGINS = (
    "hwopt.builtin.block_types",
    "hwopt.builtin.metrics",
    "hwopt.builtin.backend_torch",
    "hwopt.builtin.backend_onnxruntime",
    "hwopt.builtin.backend_tensorrt",
    "hwopt.builtin.backend_roofline",
    "hwopt.builtin.hardware_profiles",
    "hwopt.builtin.solvers",
    "hwopt.builtin.lowerings",
    "hwopt.builtin.models",
)

# hook name -> what the registered things are called in messages and listings
COLLECTIONS = {
    "hwopt_register_block_types": "block type",
    "hwopt_register_metrics": "metric",
    "hwopt_register_backends": "backend",
    "hwopt_register_hardware_profiles": "hardware profile",
    "hwopt_register_solvers": "solver",
    "hwopt_register_lowerings": "lowering",
    "hwopt_register_models": "model",
}


@dataclass
class Registry:
    """Everything one hook registered, by name, with the plugin behind each."""

    kind: str
    items: dict = field(default_factory=dict)
    plugin_of: dict = field(default_factory=dict)

    def get(self, name: str):
        if name not in self.items:
            known = ", ".join(sorted(self.items)) or "none"
            raise HwoptError(f"unknown {self.kind} {name!r} (known: {known})")
        return self.items[name]

    def __iter__(self):
        return iter(self.items.values())

    def names(self) -> list[str]:
        return list(self.items)


def _load_entry_point_plugins(pm: pluggy.PluginManager) -> None:
    """Register third-party plugins; one that fails to load is named in a warning."""
    for ep in importlib.metadata.entry_points(group="hwopt"):
        if pm.has_plugin(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:  # a broken plugin must not take hwopt down
            warnings.warn(f"hwopt plugin {ep.name!r} failed to load: {exc}", stacklevel=2)


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("hwopt")
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    _load_entry_point_plugins(pm)
    return pm


@functools.cache
def registry(hook_name: str) -> Registry:
    """Call every implementation of one registration hook and collect the results."""
    reg = Registry(COLLECTIONS[hook_name])
    for impl in getattr(plugin_manager().hook, hook_name).get_hookimpls():

        def register(item, _plugin=impl.plugin_name):
            reg.items[item.name] = item
            reg.plugin_of[item.name] = _plugin

        try:
            impl.function(register=register)
        except Exception as exc:  # one broken plugin must not take the others down
            warnings.warn(f"hwopt plugin {impl.plugin_name!r} failed to register {reg.kind}s: {exc}", stacklevel=2)
    return reg


def block_types() -> Registry:
    return registry("hwopt_register_block_types")


def metrics() -> Registry:
    return registry("hwopt_register_metrics")


def backends() -> Registry:
    return registry("hwopt_register_backends")


def hardware_profiles() -> Registry:
    return registry("hwopt_register_hardware_profiles")


def solvers() -> Registry:
    return registry("hwopt_register_solvers")


def lowerings() -> Registry:
    return registry("hwopt_register_lowerings")


def models() -> Registry:
    return registry("hwopt_register_models")


def listing() -> dict[str, dict[str, list[str]]]:
    """plugin name -> collection kind -> registered names, for ``hwopt plugins``."""
    out: dict[str, dict[str, list[str]]] = {
        name: {} for name, _ in plugin_manager().list_name_plugin()
    }
    for hook_name in COLLECTIONS:
        reg = registry(hook_name)
        for item_name, plugin in reg.plugin_of.items():
            out.setdefault(plugin, {}).setdefault(reg.kind, []).append(item_name)
    return out
