"""Plugin loading and the registries the hooks fill.

Built-in plugins (``hwopt.builtin.*``) and third-party ones (entry-point
group ``hwopt``) are registered the same way; each hook implementation is
called with a ``register`` callback, and every registered object is kept
with the name of the plugin that registered it.

The rules a registry keeps:

* a name registered twice is an error naming both plugins, unless the later
  one asks to replace it (``register(obj, replace=True)``);
* a hook implementation whose name is no hook (``hwopt_register_metric``) is
  an error naming the plugin and the hook it probably meant
  (``check_pending``); one under a renamed hook's old name
  (``hookspecs.RENAMED``) registers into the new hook's registry, and
  pluggy warns (``DeprecationWarning``) when the plugin is registered;
* ``registered(plugin)`` adds a plugin in-process for a block of code (tests,
  notebooks), and every registry is rebuilt on entry and on exit.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pluggy

from hwopt import hookspecs
from hwopt.errors import HwoptError

BUILTIN_PLUGINS = (
    "hwopt.builtin.block_types",
    "hwopt.builtin.metrics",
    "hwopt.builtin.backends",
    "hwopt.builtin.targets",
    "hwopt.builtin.solvers",
    "hwopt.builtin.formats",
    "hwopt.builtin.model_names",
)

# hook name -> what the registered things are called in messages and listings
COLLECTIONS = {
    "hwopt_register_block_types": "block type",
    "hwopt_register_metrics": "metric",
    "hwopt_register_backends": "backend",
    "hwopt_register_targets": "target",
    "hwopt_register_solvers": "solver",
    "hwopt_register_formats": "format",
    "hwopt_register_models": "model",
}


def is_builtin(plugin: str) -> bool:
    return plugin in BUILTIN_PLUGINS


@dataclass(frozen=True)
class Lazy:
    """An object registered by name and made on first use: ``Lazy("torch", "hwopt.builtin.backend_torch",
    "TorchBackend")`` imports that module only when the registry hands the object out.

    Listing what is registered (``hwopt plugins``) then imports nothing
    heavy: a plugin whose objects need torch can register them this way.
    """

    name: str
    module: str
    factory: str  # a class or function of ``module``, called with no arguments

    def make(self):
        return getattr(importlib.import_module(self.module), self.factory)()


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
        if isinstance(self.items[name], Lazy):
            item = self.items[name].make()
            if item.name != name:
                raise HwoptError(f"{self.plugin_of[name]} registered {self.kind} {name!r} lazily, but it is named "
                                 f"{item.name!r}")
            self.items[name] = item
        return self.items[name]

    def __iter__(self):
        return iter([self.get(name) for name in self.items])

    def names(self) -> list[str]:
        return list(self.items)

    def add(self, item, plugin: str, replace: bool = False) -> None:
        """Register ``item`` under ``item.name``; a name already taken is an error unless ``replace``."""
        if item.name in self.items and not replace:
            raise HwoptError(f"{self.kind} {item.name!r} is registered by both {self.plugin_of[item.name]} and "
                             f"{plugin}; uninstall one, or have {plugin} call register(..., replace=True)")
        self.items[item.name] = item
        self.plugin_of[item.name] = plugin


def _load_entry_point_plugins(pm: pluggy.PluginManager) -> None:
    """Register third-party plugins; one that fails to load is named in a warning."""
    for ep in importlib.metadata.entry_points(group="hwopt"):
        if pm.has_plugin(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:  # a broken plugin must not take hwopt down
            warnings.warn(f"hwopt plugin {ep.name!r} failed to load: {exc}", stacklevel=2)


def check_pending(pm: pluggy.PluginManager | None = None) -> None:
    """Refuse hook implementations that implement no hook (a misspelt name).

    Raises:
        HwoptError: naming the plugin, the misspelt hook and the hook it most likely meant.
    """
    pm = pm or plugin_manager()
    for name in dir(pm.hook):
        caller = getattr(pm.hook, name)
        if name.startswith("_") or not isinstance(caller, pluggy.HookCaller) or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            meant = difflib.get_close_matches(name, COLLECTIONS, n=1)
            hint = f" (did you mean {meant[0]}?)" if meant else f" (hooks: {', '.join(COLLECTIONS)})"
            raise HwoptError(f"plugin {impl.plugin_name!r} implements {name}, which is not a hwopt hook{hint}")


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("hwopt")
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    _load_entry_point_plugins(pm)
    check_pending(pm)
    return pm


def _forget_registries() -> None:
    registry.cache_clear()


@contextmanager
def registered(plugin, name: str | None = None) -> Iterator[str]:
    """Register a plugin (a module or an object with hook implementations) for the ``with`` block.

    Yields the name it is registered under (``name``, else pluggy's). Every
    registry is rebuilt on entry and again on exit, when the plugin is gone.

    Raises:
        HwoptError: a misspelt hook, or a name another plugin has registered already.
    """
    pm = plugin_manager()
    name = pm.register(plugin, name=name)
    try:
        check_pending(pm)
        _forget_registries()
        for hook_name in COLLECTIONS:  # a duplicate name fails here, not at first use
            registry(hook_name)
        yield name
    finally:
        pm.unregister(name=name)
        _forget_registries()


def hook_impls(hook_name: str) -> list:
    """The implementations of a hook, and those of its old name where it was renamed (``hookspecs.RENAMED``)."""
    pm = plugin_manager()
    names = [hook_name, *(old for old, new in hookspecs.RENAMED.items() if new == hook_name)]
    return [impl for name in names for impl in getattr(pm.hook, name).get_hookimpls()]


@functools.cache
def registry(hook_name: str) -> Registry:
    """Call every implementation of one registration hook and collect the results.

    Raises:
        HwoptError: a name registered by two plugins (see ``Registry.add``).
    """
    reg = BlockTypes() if hook_name == "hwopt_register_block_types" else Registry(COLLECTIONS[hook_name])
    for impl in hook_impls(hook_name):

        def register(item, replace: bool = False, _plugin=impl.plugin_name):
            reg.add(item, _plugin, replace)

        try:
            impl.function(register=register)
        except HwoptError:
            raise
        except Exception as exc:  # one broken plugin must not take the others down
            warnings.warn(f"hwopt plugin {impl.plugin_name!r} failed to register {reg.kind}s: {exc}", stacklevel=2)
    return reg


class BlockTypes(Registry):
    """The registered block types, and the one that owns each sub-block config or ``block_configs`` entry.

    A run uses the built-in block types plus those of the plugins it names
    (``select``); reading a config.json uses every installed one, so any
    child an installed plugin can describe is read.
    """

    def __init__(self, items: dict | None = None, plugin_of: dict | None = None):
        super().__init__("block type", items or {}, plugin_of or {})

    def _named(self, block_type) -> str:
        return f"{block_type.name} ({self.plugin_of[block_type.name]})"

    def of_kind(self, kind: str) -> list:
        return [t for t in self if t.kind == kind]

    def of(self, cfg):
        """The block type whose ``matches`` accepts ``cfg``.

        Raises:
            HwoptError: when none does, or when two do (naming both and their plugins).
        """
        owners = [t for t in self if t.matches(cfg)]
        if len(owners) > 1:
            raise HwoptError(f"block types {' and '.join(map(self._named, owners))} both claim {cfg}; "
                             f"a plugin's block type needs a config class of its own")
        if not owners:
            raise HwoptError(f"no registered block type handles {cfg}")
        return owners[0]

    def to_json(self, cfg, model_config) -> dict:
        """The ``block_configs`` entry (attention or ffn) of one sub-block config."""
        return self.of(cfg).to_json(cfg, model_config)

    def from_json(self, kind: str, entry: dict, model_config, where: str):
        """The config of one ``block_configs`` entry, read by the block type of ``kind`` that owns it.

        The owner is the one type that ``claims`` the entry or, when several
        do, the one whose ``keys`` cover every key the entry sets (a plugin's
        ``window_length`` entry is its own, not grouped-query attention's).

        Raises:
            HwoptError: one line naming ``where``: no type claims the entry, two own it (naming both and their
                plugins), or the owner finds a bad field (naming the key).
        """
        from hwopt.model.config import INFORMATIONAL, Fields

        Fields(entry, where, f"{kind}.")  # an object, or one line saying it is not
        owners = [t for t in self.of_kind(kind) if t.claims(entry)]
        if len(owners) > 1:
            set_keys = {k for k, v in entry.items() if v not in (None, False)} - INFORMATIONAL[kind]
            owners = [t for t in owners if set_keys <= t.keys] or owners
        if len(owners) > 1:
            raise HwoptError(f"{where}: the {kind} entry {entry} is claimed by block types "
                             f"{' and '.join(map(self._named, owners))}")
        if not owners:
            raise HwoptError(f"{where}: no registered {kind} block type reads {entry}")
        return owners[0].from_json(entry, model_config, where)

    def select(self, plugins: tuple[str, ...] | list[str] = ()) -> BlockTypes:
        """The built-in block types plus those registered by ``plugins`` (plugin names, as ``hwopt plugins``
        lists them).

        Raises:
            HwoptError: a name that is no plugin registering block types.
        """
        offered = {p for p in self.plugin_of.values() if not is_builtin(p)}
        for name in plugins:
            if name not in offered:
                raise HwoptError(f"--block-types {name}: no installed plugin of that name registers block types "
                                 f"(those that do: {', '.join(sorted(offered)) or 'none'})")
        keep = {n for n, p in self.plugin_of.items() if is_builtin(p) or p in plugins}
        return BlockTypes({n: t for n, t in self.items.items() if n in keep},
                          {n: p for n, p in self.plugin_of.items() if n in keep})

    def options(self) -> dict[str, str]:
        """Search-space options the block types take (``--window``), name -> help."""
        return {name: help for t in self for name, help in getattr(t, "options", {}).items()}


def block_types() -> BlockTypes:
    return registry("hwopt_register_block_types")


def metrics() -> Registry:
    return registry("hwopt_register_metrics")


def backends() -> Registry:
    return registry("hwopt_register_backends")


def targets() -> Registry:
    return registry("hwopt_register_targets")


def solvers() -> Registry:
    return registry("hwopt_register_solvers")


def formats() -> Registry:
    """The output formats, by the name ``--format`` takes."""
    return registry("hwopt_register_formats")


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
