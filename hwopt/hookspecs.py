"""The hooks a hwopt plugin implements.

Every hook registers a collection through a callback, in the style of `llm`
and datasette::

    @hwopt.hookimpl
    def hwopt_register_metrics(register):
        register(MyMetric())

``register(obj)`` files ``obj`` under ``obj.name``; a name another plugin
has registered already is an error naming both, unless the plugin asks to
take it over with ``register(obj, replace=True)``. A hook implementation
whose name is not one of these hooks is an error (``hwopt.plugins.check_pending``).
Two hooks were renamed (``RENAMED``); a plugin implementing the old name
still registers, with a ``DeprecationWarning`` naming the new hook.

What each registered object provides is one protocol in ``hwopt.protocols``
(real signatures, shapes and units); the built-ins in ``hwopt/builtin`` use
these same hooks and implement those protocols.
"""

import pluggy

hookspec = pluggy.HookspecMarker("hwopt")
hookimpl = pluggy.HookimplMarker("hwopt")


@hookspec
def hwopt_register_block_types(register):
    """Register attention or FFN variant families: ``hwopt.protocols.BlockType`` objects.

    A block type owns its configs end to end: the variants it offers for a
    parent layer, its ``block_configs`` entry (read, checked, written), how
    its sub-block is built, initialised from the parent and called, its
    parameter count, its KV cache per token (``KVCacheShape``) and its cost
    terms per phase. A run uses the built-in block types plus those of the
    plugins it names (``--block-types PLUGIN``); reading a config.json uses
    every installed one.
    """


@hookspec
def hwopt_register_metrics(register):
    """Register replace-1-block scores: ``hwopt.metric.Metric`` objects.

    ``compute(student, teacher) -> float`` compares two
    ``hwopt.metric.Outputs`` on the same held-out tokens; ``higher_is_better``
    tells the solver which way to optimise it.
    """


@hookspec
def hwopt_register_backends(register):
    """Register measurement backends: ``hwopt.protocols.Backend`` objects.

    ``prepare(workload, target) -> timer``: everything set up to time
    ``workload`` (a sub-block variant, or the model outside its layers, in
    prefill and decode phases), warmed up, and a callable whose every call is
    one round: the milliseconds of each of ``workload.phases``. The profile
    calls the timers of all variants in turn, round after round
    (``hwopt.timing``), so a round should be short and must not depend on the
    rounds before it. ``available`` says whether it can run here and why not.
    """


@hookspec
def hwopt_register_targets(register):
    """Register targets: ``hwopt.targets.Target`` objects (memory in GiB, bandwidth in GB/s,
    dense peak TFLOP/s per dtype; the dtypes it computes in default to those with a peak rate)."""


@hookspec
def hwopt_register_solvers(register):
    """Register solvers: ``hwopt.problem.Solver`` objects.

    ``solve(problem, time_limit_s) -> Solution | None`` (None: no choice meets
    the budgets); optionally ``exact`` (False for a heuristic, whose None
    proves nothing; default True) and ``compile(problem)``, a model that
    Pareto sweeps re-solve under a moving budget.
    """


@hookspec
def hwopt_register_formats(register):
    """Register output formats, the names ``--format`` takes: ``hwopt.protocols.Format`` objects
    (``lower(model, tokenizer, out_dir, options)``).

    ``hwopt lower --help`` lists each one's ``description`` and ``needs``.
    """


@hookspec
def hwopt_register_models(register):
    """Register model names: ``hwopt.model_source.ModelSpec`` objects (a name to an architecture and its weights)."""


# --- renamed hooks, kept for one release -----------------------------------------------------------------------
# old name -> new name: the registry of the new hook also calls the implementations of the old one
RENAMED = {
    "hwopt_register_hardware_profiles": "hwopt_register_targets",
    "hwopt_register_lowerings": "hwopt_register_formats",
}


def _renamed(old: str):
    warning = DeprecationWarning(f"{old} is deprecated and goes in the next hwopt release: implement "
                                 f"{RENAMED[old]} (same register callback)")
    return hookspec(warn_on_impl=warning)


@_renamed("hwopt_register_hardware_profiles")
def hwopt_register_hardware_profiles(register):
    """Deprecated: the old name of ``hwopt_register_targets``."""


@_renamed("hwopt_register_lowerings")
def hwopt_register_lowerings(register):
    """Deprecated: the old name of ``hwopt_register_formats``."""
