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
    ``variant_name(config) -> str``, ``num_params(config, model_config)``,
    ``kv_cache_elements_per_token(config, model_config)`` and, for the
    roofline model, ``cost_terms(config, model_config, phase) ->
    hwopt.roofline.CostTerms`` (FLOPs and elements moved in one forward).
    """


@hookspec
def hwopt_register_metrics(register):
    """Register replace-1-block scores.

    A metric has ``name``, ``higher_is_better`` (the solver maximises the
    metric when True, minimises it otherwise), an optional ``needs``
    (``{"task"}`` for a metric that reads the ``--task-data`` questions) and
    ``compute(student, teacher) -> float``. Both arguments are
    ``hwopt.metric.Outputs`` on the same held-out tokens: ``logits``
    ``[tokens, vocab]``, ``hidden`` ``[tokens, hidden]`` (the final hidden
    states, after the final norm), ``labels`` ``[tokens]`` (next token, -100
    where none), ``model`` (token ids to logits, for a metric that runs its
    own evaluation; the student's starts from the parent's cached
    activations at the swapped layer) and ``task`` (those questions,
    tokenised; see ``hwopt.tasks``).
    """


@hookspec
def hwopt_register_backends(register):
    """Register measurement backends: how a block's cost on a target is found.

    A backend has ``name``; ``measures`` (True when it times real runs on a
    device, False when it estimates); ``available(target, scenario) ->
    (bool, reason)`` (whether it can work here, and if not, why not);
    ``describe(target, scenario) -> dict`` (the source every figure it makes
    carries: ``device``, ``backend`` and ``method`` for a measurement,
    ``model`` for an estimate); and ``prepare(workload, target) -> timer``:
    everything set up to time ``workload`` (see ``hwopt.workload``: a
    sub-block variant, or the model outside its layers, in prefill and
    decode phases), warmed up, and a callable whose every call is one round:
    the milliseconds of each of ``workload.phases``. The profile calls the
    timers of all variants in turn, round after round (``hwopt.timing``), so
    a round should be short (one pass over the rotation of inputs and weight
    copies) and must not depend on the rounds before it.
    """


@hookspec
def hwopt_register_hardware_profiles(register):
    """Register targets (``hwopt.hardware.HardwareProfile`` objects)."""


@hookspec
def hwopt_register_solvers(register):
    """Register search backends.

    A solver has ``name`` and ``solve(problem, time_limit_s) -> Solution | None``
    (``None`` when it found no choice that meets the budgets); optionally
    ``exact`` (False for a heuristic, whose None proves nothing; default True)
    and ``compile(problem)``, a model that Pareto sweeps re-solve under a
    moving budget. See ``hwopt.problem.Solver`` and ``hwopt.builtin.solvers``.
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
