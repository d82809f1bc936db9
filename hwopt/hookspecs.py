"""The hooks a hwopt plugin implements.

Every hook registers a collection through a callback, in the style of `llm`
and datasette::

    @hwopt.hookimpl
    def hwopt_register_metrics(register):
        register(MyMetric())

The built-in block types, metrics, backends, hardware profiles, solvers,
lowerings and models use these same hooks (see ``hwopt/builtin``).
What each registered object must provide is described on its hook.
"""

import pluggy

hookspec = pluggy.HookspecMarker("hwopt")
hookimpl = pluggy.HookimplMarker("hwopt")


@hookspec
def hwopt_register_block_types(register):
    """Register variant families for attention or FFN sub-blocks.

    A block type has ``name``, ``kind`` ("attention" or "ffn") and:
    ``variants(parent, options) -> list[sub-block config]`` (what to offer for
    a parent layer), ``matches(config) -> bool``, ``build(config, model_config)
    -> nn.Module``, ``init_from_parent(module, parent_module, inputs)``,
    ``variant_name(config) -> str`` and ``num_params(config, model_config)``.
    """


@hookspec
def hwopt_register_metrics(register):
    """Register replace-1-block scores.

    A metric has ``name``, ``higher_is_better`` and
    ``compute(student_logits, teacher_logits, labels) -> float``
    (logits are ``[tokens, vocab]`` float tensors, labels ``[tokens]``).
    """


@hookspec
def hwopt_register_backends(register):
    """Register measurement backends.

    A backend has ``name``, ``available(target) -> (bool, reason)`` and
    ``measure(module, phase_inputs, repeats, warmup) -> milliseconds``.
    """


@hookspec
def hwopt_register_hardware_profiles(register):
    """Register targets (``hwopt.hardware.HardwareProfile`` objects)."""


@hookspec
def hwopt_register_solvers(register):
    """Register search backends.

    A solver has ``name`` and ``solve(problem, time_limit_s) -> Solution | None``
    (``None`` when the problem is infeasible); see ``hwopt.problem``.
    """


@hookspec
def hwopt_register_lowerings(register):
    """Register output formats.

    A lowering has ``name`` and ``lower(model, tokenizer, out_dir)``; it
    writes into ``out_dir``, which the pipeline then renames into place.
    """


@hookspec
def hwopt_register_models(register):
    """Register model names (``hwopt.models.ModelSpec`` objects)."""
