"""A run: its settings, its directory, what they name resolved once, and the driver that runs the passes.

Settings (``hwopt.settings``) come from defaults, then the run directory's ``run.json`` (what
earlier commands on this run said), then the command line; the merged
settings are saved back, so ``hwopt solve --workdir runs/demo --speedup 2``
needs no other option. Each pass describes itself in its module of
``hwopt.passes`` (the settings and outputs it reads, what it writes, its
check, its plan and the function that runs it); a ``Run`` is what those
functions are handed, and its driver (``run_pass``, ``optimize``) checks,
fingerprints, skips or stages each pass the same way.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch

from hwopt.bld import (
    Child,
    Library,
)
from hwopt.data import (
    SAMPLING_BATCH,
    VALIDATION_ENGLISH,
    ParentSampling,
    cached_parent_samples,
    check_data_files,
    data_sha256,
    general_heldout,
    load_split,
    parent_samples_file,
    read_corpus,
)
from hwopt.devices import Placement, deployed_placement, device_memory, resolve_placement
from hwopt.distributed import Ranks, local_world, ranks, staged_on_ranks
from hwopt.errors import HwoptError
from hwopt.lowering.runtimes import Runtime, resolve_runtime
from hwopt.memory_plan import MemoryPlan, sampling_plan
from hwopt.model.layerwise import LayerwiseParent
from hwopt.model.modeling import HeteroLlamaForCausalLM
from hwopt.model_source import resolve_model
from hwopt.passes import PASS_INFO, upstream
from hwopt.pipeline import (
    PASSES,
    atomic_write_json,
    atomic_write_text,
    cache_root,
    fingerprint,
    is_up_to_date,
    kept_units,
    mark_not_up_to_date,
    output_hash,
    read_manifest,
    units_dir,
)
from hwopt.plugins import block_types, metrics
from hwopt.progress import console
from hwopt.report import build_report, plan_text, print_report, whole_plan
from hwopt.search_space import Scenario, SearchSpace
from hwopt.settings import EVALUATION_TOKENS, Settings, load_settings
from hwopt.targets import resolve_target
from hwopt.tasks import read_task
from hwopt.timing import check_threads, idle_cores
from hwopt.two_layer import child_of


class Run:
    def __init__(self, workdir: Path, settings: Settings):
        self.workdir = Path(workdir).absolute()  # its outputs are read as workdir / path: a relative one twice
        self.settings = settings

    # --- what the settings name, resolved once -------------------------------------------------
    @cached_property
    def source(self):
        return resolve_model(self.settings.model)

    @cached_property
    def target(self):
        return resolve_target(self.settings.target)

    @cached_property
    def scenario(self) -> Scenario:
        s = self.settings
        return Scenario.for_target(self.target, s.scenario, s.batch, s.dtype, s.kv_dtype)

    @cached_property
    def space(self) -> SearchSpace:
        s = self.settings
        linear = s.linear and self.runtime.linear  # vLLM and SGLang run no linear blocks
        return SearchSpace(tuple(s.kv_heads) if s.kv_heads else None, tuple(s.ffn_fractions), linear, s.no_op,
                           tuple(s.block_types), tuple((k, tuple(v)) for k, v in sorted(s.block_options.items())))

    @cached_property
    def runtime(self) -> Runtime:
        return resolve_runtime(self.settings.runtime, self.target)

    @cached_property
    def placement(self) -> Placement:
        return resolve_placement(self.settings.device, self.settings.train_dtype, self.target.kind)

    @cached_property
    def ranks(self) -> Ranks:
        return ranks()

    @cached_property
    def parent(self):
        """The whole parent, on the run's device in its train dtype."""
        return self.source.load(self.placement.device, self.placement.dtype)

    @cached_property
    def deployed(self) -> Placement:
        """Where whole models are timed and compared as they will serve (``hwopt.devices.deployed_placement``)."""
        return deployed_placement(self.placement, self.scenario.dtype)

    @cached_property
    def deployed_parent(self):
        """The whole parent as it will serve: ``parent`` itself when the train dtype is the scenario's."""
        if self.deployed == self.placement:
            return self.parent
        return self.source.load(self.deployed.device, self.deployed.dtype)

    @cached_property
    def layerwise_parent(self) -> LayerwiseParent:
        """The parent read a layer at a time (library and score never hold it whole), in the run's placement."""
        return self.layerwise_parent_on(self.placement)

    def layerwise_parent_on(self, placement: Placement) -> LayerwiseParent:
        """The parent read a layer at a time onto ``placement``'s device in its dtype (reads nothing yet)."""
        return LayerwiseParent(self.source.require_weights(), block_types(), placement.device, placement.dtype)

    @cached_property
    def tokenizer(self):
        return self.source.tokenizer()

    @cached_property
    def _weights_id(self) -> str:
        """The parent's weights, named for the cache of samples drawn from them: their folder, files and sizes."""
        weights = self.source.require_weights()
        return json.dumps([str(weights.resolve()),
                           sorted((f.name, f.stat().st_size) for f in weights.glob("*.safetensors"))])

    @property
    def sampling(self) -> ParentSampling:
        s = self.settings
        return ParentSampling(s.distill_samples, s.seq_len, s.seed, s.distill_temperature)

    def sampling_plan(self) -> tuple[MemoryPlan, bool] | None:
        """The memory plan of drawing ``--distill-samples`` from the parent, when they are to be drawn, and whether
        it reads the parent a layer at a time: it does where the parent whole is over ``--max-memory`` or the GPU.
        None with ``--distill-samples 0``, or when they are cached from an earlier run."""
        s = self.settings
        if not s.distill_samples:
            return None
        try:
            weights_id = self._weights_id
        except HwoptError:  # no weights: the pass's own check says so
            return None
        path, sequences, _ = parent_samples_file(self.tokenizer, weights_id, self.sampling, cache_root())
        if path.is_file():
            return None
        args = (self.source.config, self.source.block_configs, min(sequences, SAMPLING_BATCH), s.seq_len,
                self.placement)
        whole = sampling_plan(*args)
        if whole.over(s.max_memory, self.device_memory):
            return sampling_plan(*args, layerwise=True), True
        return whole, False

    @cached_property
    def parent_samples(self) -> torch.Tensor | None:
        """``--distill-samples`` tokens sampled from the parent (from the cache when they are there); None for none.
        The sampling's memory plan is printed first (the pass's check refuses one that does not fit)."""
        s = self.settings
        if not s.distill_samples:
            return None
        plan, layerwise = self.sampling_plan() or (None, False)
        if plan:
            console.print("\n".join(plan.lines(self.ranks.world)), highlight=False)
        return cached_parent_samples(lambda: self.layerwise_parent if layerwise else self.parent, self.tokenizer,
                                     self._weights_id, self.sampling, cache_root())

    @cached_property
    def split(self):
        return load_split(self.settings.data, self.tokenizer, self.settings.seq_len, self.parent_samples)

    @cached_property
    def data_sha256(self) -> str:
        """``split.sha256`` without tokenizing the corpus: all a check of whether a pass is up to date needs."""
        return data_sha256(read_corpus(self.settings.data)[0], self.parent_samples)

    @cached_property
    def general_heldout(self):
        return general_heldout(self.tokenizer, self.settings.seq_len)

    @cached_property
    def validation_english(self):
        """[sequences, seq_len] token ids of the text solve picks its child by (``hwopt.selection``)."""
        return general_heldout(self.tokenizer, self.settings.seq_len, VALIDATION_ENGLISH)

    @cached_property
    def metric_objects(self):
        return [metrics().get(name) for name in self.settings.metrics]

    @cached_property
    def task(self):
        return read_task(self.settings.task_data, self.tokenizer) if self.settings.task_data else None

    def dir(self, name: str) -> Path:
        return self.workdir / name

    def output(self, name: str, artifact: str, folder: Path | None = None) -> Path:
        """Pass ``name``'s artifact (``PassInfo.outputs``): in its finished folder, or in ``folder`` while it is
        being written."""
        return (folder or self.dir(name)) / PASS_INFO[name].outputs[artifact]

    def read_json(self, path: str | Path):
        return json.loads((self.workdir / path).read_text())

    # --- passes ---------------------------------------------------------------------------------
    def fingerprint(self, name: str, units: bool = False) -> str:
        """Pass ``name``'s fingerprint: its settings and the outputs it reads. ``units``: that of its kept units of
        work (``hwopt.pipeline.kept_units``), which leaves out the outputs it only joins in (``PassInfo.joins``)."""
        keys, reads = PASS_INFO[name].settings, PASS_INFO[name].reads
        if units:
            reads = tuple(up for up in reads if up not in PASS_INFO[name].joins)
        if any(not output_hash(self.dir(up)) for up in reads):
            before = upstream(name)
            missing = [up for up in before if not output_hash(self.dir(up))]
            raise HwoptError(f"{name} needs the outputs of {', '.join(missing)} in {self.workdir}: run `hwopt "
                             f"optimize --workdir {self.workdir} --until {before[-1]}` first (it skips what is up to "
                             "date)")
        settings = {k: getattr(self.settings, k) for k in keys}
        if "linear" in keys:  # what --runtime leaves of --no-linear's choice
            settings["linear"] = self.space.linear
        if name in ("profile", "library"):
            settings["architecture"] = self.source.config.to_json_string(use_diff=False)
        if name == "profile":  # `cpu` names whichever machine this is: timings from another one are stale
            settings["device"] = self.target.description
        if name == "library":
            weights = self.source.require_weights()
            settings["weights"] = sorted((f.name, f.stat().st_size) for f in weights.glob("*.safetensors"))
        if "data" in keys:
            settings["data_sha256"] = self.data_sha256
        if "task_data" in keys and self.task:
            settings["task_data_sha256"] = self.task.sha256
        return fingerprint(settings, {up: output_hash(self.dir(up)) for up in reads})

    @contextmanager
    def restoring_settings_on_failure(self) -> Iterator[None]:
        """Around a command: if it fails (``HwoptError``), an existing run's remembered settings are put back as they
        were, so the next command does not inherit the setting that failed. A new run keeps what its first
        command said."""
        remembered = self.workdir / "run.json"
        before = remembered.read_text() if remembered.is_file() else None
        try:
            yield
        except HwoptError:
            if before is not None and self.ranks.is_main:
                atomic_write_text(remembered, before)
            raise

    def save_settings(self) -> None:
        """Remember this command's settings for the next command on the run (once they proved valid)."""
        atomic_write_json(self.workdir / "run.json", dataclasses.asdict(self.settings))

    def use_threads(self) -> None:
        """Run torch on ``--threads`` CPU threads; without it, on one per core other processes leave idle now.

        The choice is saved with the run's settings, so that every later
        command (the profile, its check, the closing report) times with the
        same count.
        """
        s = self.settings
        if s.threads is None:  # under torchrun: rank 0 shares the idle cores among this machine's ranks
            threads, load = idle_cores()
            s.threads = self.ranks.from_main(max(1, threads // local_world()))
            console.print(f"threads: {s.threads} ({load.describe()}); the run keeps this number, --threads N "
                          "changes it")
        torch.set_num_threads(check_threads(s.threads))

    def require_run(self, first: str) -> None:
        """Passes from ``first`` on read earlier passes' outputs: the run directory must hold a run.

        Raises:
            HwoptError: ``--workdir`` holds no run (most likely mistyped).
        """
        if PASS_INFO[first].reads and not (self.workdir / "run.json").is_file():
            raise HwoptError(f"{self.workdir} holds no run (no run.json), and {first} needs the outputs of "
                             f"{', '.join(upstream(first))}: check --workdir, or start the run with `hwopt optimize`")

    def check_upstream_settings(self, name: str) -> None:
        """Refuse a setting changed on this command that a pass before ``name`` already ran with.

        Such a pass is stale: its outputs no longer match the run's settings,
        and a later pass would quietly mix both. Saying so is better than
        redoing a long pass the user did not ask for.

        Raises:
            HwoptError: naming the stale pass, the settings changed, and the command that redoes it.
        """
        saved = load_settings(self.workdir, {})
        for up in upstream(name):
            changed = [k for k in PASS_INFO[up].settings if getattr(saved, k) != getattr(self.settings, k)]
            if changed and output_hash(self.dir(up)):
                what = ", ".join(f"{k} {getattr(saved, k)} -> {getattr(self.settings, k)}" for k in changed)
                raise HwoptError(f"{up} ran with other settings ({what}), so it is stale for {name}: run "
                                 f"`hwopt optimize --workdir {self.workdir} --from {up} --until {name}` with the "
                                 f"new settings, or leave them out")

    def check_upstream_current(self, name: str) -> None:
        """Refuse to run ``name`` on the output of an earlier pass that is itself out of date: something it reads
        changed after it ran (e.g. ``hwopt solve`` again, then ``hwopt lower`` without ``uptrain`` between).

        A pass kept although it failed its checks (a noisy profile) is used as it is, as its warning said.

        Raises:
            HwoptError: naming the stale pass and the command that brings it and ``name`` up to date.
        """
        for up in upstream(name):
            manifest = read_manifest(self.dir(up))
            if manifest is None or manifest.get("failed_checks"):
                continue  # not run yet (the fingerprint says so), or kept despite its checks
            if manifest.get("fingerprint") != self.fingerprint(up):
                raise HwoptError(f"{up} is out of date (what it reads changed after it ran), so {name} would read "
                                 f"stale outputs: run `hwopt optimize --workdir {self.workdir} --from {up} "
                                 f"--until {name}`")

    def say_what_is_out_of_date(self, last: str) -> None:
        """After a command that ran up to ``last``: name the later passes whose outputs what it did made out of date
        (``hwopt solve --speedup 2`` on a finished run leaves uptrain and lower holding the old child), and the
        command that makes them again. Said nothing where telling would mean drawing the parent samples first (they
        are in the fingerprints of the passes that train, and not in the cache): minutes, for a hint."""
        if self.sampling_plan() is not None:
            return
        stale = []
        for name in PASSES[PASSES.index(last) + 1:]:  # in order: a pass reading a stale one's outputs is stale too
            if read_manifest(self.dir(name)) is not None and (set(upstream(name)) & set(stale)
                                                              or not self._up_to_date(name)):
                stale.append(name)
        if stale and self.ranks.is_main:
            console.print(f"{', '.join(stale)}: made from earlier outputs, so out of date: `hwopt optimize --workdir "
                          f"{self.workdir} --from {stale[0]}` makes them again", soft_wrap=True, highlight=False)

    def _up_to_date(self, name: str) -> bool:
        """Whether pass ``name``'s outputs were made from what the run holds now; not when something it reads is
        gone."""
        try:
            return is_up_to_date(self.dir(name), self.fingerprint(name))
        except HwoptError:
            return False

    def run_pass(self, name: str, force: bool = False) -> None:
        """Run one pass, unless it is up to date (``force``: run it anyway).

        Under torchrun, library, score and uptrain run on every rank; the other passes on rank 0 while the
        others wait (``hwopt.distributed``).
        """
        self._validate(name)  # bad input fails before anything is said or chosen
        self.check_upstream_settings(name)
        self.check_upstream_current(name)
        self.use_threads()
        if self.ranks.is_main:
            self.save_settings()
        fp = self.fingerprint(name)
        if is_up_to_date(self.dir(name), fp) and not force:
            console.print(f"[dim]{name}: up to date, skipped (--force runs it again)[/dim]")
            return
        console.print(f"[bold]{name}[/bold]")
        if plan := self.memory_plan(name):
            console.print("\n".join(plan.lines(self.ranks.world)), highlight=False)
        if force and self.ranks.is_main:  # run again means every unit of work
            shutil.rmtree(units_dir(self.dir(name)), ignore_errors=True)
        works_here = PASS_INFO[name].sharded or self.ranks.is_main
        with staged_on_ranks(self.dir(name), fp, self.ranks) as out:
            problems = PASS_INFO[name].call(self, out) if works_here else None
        if problems:  # only the profile checks itself so far
            for line in problems:
                console.print(f"[yellow]{name}: warning: {line}[/yellow]", soft_wrap=True)  # one line, however long
            mark_not_up_to_date(self.dir(name), problems)
            console.print(f"[yellow]{name}: failed its checks, so it is not recorded as up to date: the next "
                          f"`hwopt optimize` or `hwopt {name}` runs it again; this command, and a later pass run on "
                          "its own, go on with it[/yellow]", soft_wrap=True)

    def _validate(self, name: str) -> None:
        """Resolve what a pass will need before it starts, then run its own check, so bad input fails at once."""
        _ = self.source, self.target, self.scenario, self.runtime, self.space.block_types()
        if "device" in PASS_INFO[name].settings + PASS_INFO[name].also_reads:
            _ = self.placement
        if plan := self.memory_plan(name):
            plan.check(self.settings.max_memory, self.device_memory)
        if "data" in PASS_INFO[name].settings:
            check_data_files(self.settings.data)
            if self.settings.distill_samples < 0:
                raise HwoptError(f"--distill-samples must be 0 or more tokens, not {self.settings.distill_samples}")
            if not self.settings.distill_temperature > 0:
                raise HwoptError(f"--distill-temperature must be above 0, not {self.settings.distill_temperature:g}")
            sampling, _ = self.sampling_plan() or (None, False)
            if sampling and (problem := sampling.over(self.settings.max_memory, self.device_memory)):
                raise HwoptError(f"{problem}: give --distill-samples 0 (no samples from the parent), or more "
                                 "memory")
        PASS_INFO[name].check(self)

    @cached_property
    def device_memory(self) -> int | None:
        """Bytes of memory on the run's GPU; None on the CPU."""
        return device_memory(self.placement.device)

    def memory_plan(self, name: str) -> MemoryPlan | None:
        """What pass ``name`` will hold at its peak per rank (``hwopt.memory_plan``); None for the passes that do
        not run the parent."""
        plan = PASS_INFO[name].plan
        return plan(self) if plan else None

    def kept_units(self, name: str) -> Path:
        """Pass ``name``'s folder of units of work kept across changes to what it only joins in
        (``hwopt.pipeline.kept_units``), prepared by rank 0 for every rank."""
        if self.ranks.is_main:
            kept_units(self.dir(name), self.fingerprint(name, units=True))
        self.ranks.barrier()
        return units_dir(self.dir(name))

    def library(self, coupled: bool = True, solve_dir: Path | None = None) -> Library:
        """The run's block library, with the solve pass's coupled-BLD pairs (in ``solve_dir`` while solve writes
        them) unless ``coupled`` is false."""
        coupled_dir = self.output("solve", "coupled", solve_dir) if coupled else None
        return Library(self.dir("library"), self.layerwise_parent, coupled_dir, self.placement)

    def child(self, solution: dict, coupled_dir: Path | None = None, placement: Placement | None = None) -> Child:
        """A solution's child (an entry of ``solutions.json``), with its two-layer blocks and coupled-BLD pairs
        (``coupled_dir``, default the solve pass's), read a piece at a time onto ``placement``'s device in its dtype
        (default: the run's device in fp32, the weights as stored, for a child that trains in fp32 whatever the
        train dtype): built whole by ``assemble``, sharded by uptrain under FSDP."""
        placement = placement or Placement(self.placement.device, torch.float32)
        parent = self.layerwise_parent if placement == self.placement else self.layerwise_parent_on(placement)
        library = Library(self.dir("library"), parent, coupled_dir or self.output("solve", "coupled"), placement)
        two_layer = Library(self.dir("library"), parent, self.output("library", "two_layer"), placement)
        return child_of(library, two_layer, [tuple(v) for v in solution["variants"]], solution.get("spans", []))

    def assemble(self, solution: dict, coupled_dir: Path | None = None, placement: Placement | None = None
                 ) -> HeteroLlamaForCausalLM:
        """``child``'s child built whole, fp32, on ``placement``'s device (default the run's; see ``child``)."""
        return self.child(solution, coupled_dir, placement).whole()

    def report_models(self) -> tuple[LayerwiseParent, LayerwiseParent, MemoryPlan, str | None]:
        """The uptrained child and the parent, read a layer at a time onto the deployed placement (nothing read
        yet), the plan of holding both whole there (``hwopt.report.whole_plan``, within ``--max-memory`` and the
        GPU), and why they are compared a layer at a time and not timed: None when the plan fits."""
        child = LayerwiseParent(self.output("uptrain", "model"), block_types(), self.deployed.device,
                                self.deployed.dtype)
        parent = self.layerwise_parent_on(self.deployed)
        plan, not_measured = whole_plan(child, parent, self.scenario, self.settings.seq_len, self.deployed,
                                        self.settings.max_memory, self.device_memory)
        return child, parent, plan, not_measured

    def report(self) -> dict:
        """Parent against the child, both timed here, or compared a layer at a time where they do not fit together
        (``report_models``); recomputed only when the child, the scenario or that choice changed."""
        child, parent, plan, not_measured = self.report_models()
        fp = fingerprint({"scenario": self.scenario.to_json(), "data_sha256": self.data_sha256,
                          "general_heldout": self.general_heldout.tolist(), "heldout_tokens": EVALUATION_TOKENS,
                          "task_data_sha256": self.task.sha256 if self.task else None,
                          **({"layerwise": True} if not_measured else {})},  # a fitting run's fingerprint as before
                         {"lower": output_hash(self.dir("lower")), "solve": output_hash(self.dir("solve"))})
        path = self.workdir / "report.json"
        if path.is_file() and (old := json.loads(path.read_text())).get("fingerprint") == fp:
            print_report(old)
            return old
        console.print(plan_text(plan, not_measured), highlight=False, soft_wrap=True)
        if not_measured is None:
            child, parent = child.whole(), self.deployed_parent
        texts = {"heldout": self.split.heldout_batches(EVALUATION_TOKENS), "general": self.general_heldout}
        report = build_report(parent, child, self.read_json(self.output("solve", "solutions")), self.scenario, texts,
                              self.deployed, self.target, self.task, not_measured)
        report["fingerprint"] = fp
        atomic_write_json(path, report)
        print_report(report)
        return report

    def optimize(self, start: str = "profile", until: str = "lower", force: bool = False) -> None:
        """Run the passes from ``start`` to ``until`` (``force``: every one of them, even if up to date)."""
        span = PASSES[PASSES.index(start): PASSES.index(until) + 1]
        for name in span:
            self._validate(name)
        self.check_upstream_settings(start)
        self.use_threads()
        for name in span:
            self.run_pass(name, force)
        self.say_what_is_out_of_date(until)
        if until == "lower" and self.ranks.is_main:
            self.report()
            self.print_child(report=True)

    def print_child(self, report: bool) -> None:
        """Where lower put the child, a folder per format (and the closing report, when it is written)."""
        formats = ", ".join(f"{self.dir('lower') / name}" for name in self.settings.formats)
        after = f" (report: {self.workdir / 'report.json'})" if report else ""
        console.print(f"the child: {formats}{after}", highlight=False)
