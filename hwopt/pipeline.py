"""The run directory and the rules every pass follows.

Each pass writes one folder of the run directory. It is built in
``<pass>.partial/`` and renamed into place only when complete, so a killed
pass never leaves a half-written artifact at the real name. Inside the
partial folder a pass may keep finished units of work (one file per layer,
say), each written atomically; a rerun with the same fingerprint keeps them
and carries on from there.

A pass that only joins some of its inputs in at the end (score joins the
profile's costs with its metrics) keeps its finished units in
``<pass>.units/`` instead, stamped with a fingerprint that leaves those
inputs out: a change there redoes the join, not the units.

A pass's fingerprint hashes its settings and the content hashes of the
artifacts it reads; a pass whose fingerprint matches its manifest is
skipped, unless forced. A pass that failed its own checks (a profile too
noisy to trust) keeps its outputs but no fingerprint, so it is redone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hwopt.errors import HwoptError

if TYPE_CHECKING:
    from hwopt.memory_plan import MemoryPlan
    from hwopt.run import Run

PASSES = ("profile", "library", "score", "solve", "uptrain", "lower")  # in the order they run
UNSET = "none"  # `--memory none`: forget a remembered setting that has no default (a budget, --threads, ...)
MANIFEST = ".manifest.json"
FINGERPRINT = ".fingerprint"
LOCK = ".lock"
UMASK = os.umask(0o022)  # read once (setting it is the only way to read it), and put back at once
os.umask(UMASK)
READABLE = 0o666 & ~UMASK  # a file's mode as open() would create it: tempfile and safetensors write 0600


@dataclass(frozen=True)
class PassInfo:
    """What a pass declares about itself in its module (``hwopt.passes.<name>``), in the manner of TVM's
    ``PassInfo`` and torch.fx's ``PassBase``: the settings it reads, the passes whose outputs it reads (requires),
    the outputs it writes into ``<workdir>/<name>/`` (ensures), and the functions a run calls.

    ``settings`` are those its fingerprint covers: a change to one reruns
    the pass, and the passes after it. ``also_reads``: settings it reads
    that leave its outputs unchanged (its command's help lists them too).
    ``outputs``: artifact -> its path inside the pass's folder, named here
    once for the pass that writes it and the passes that read it. ``joins``:
    those of ``reads`` whose outputs the pass only joins into its result in a
    last, cheap step: its units of work (``kept_units``) do not depend on
    them, so a change there redoes that step alone.

    ``check(run)`` runs before any pass of a command starts, so bad input
    fails at once (raises ``HwoptError``). ``call(run, out)`` writes the
    outputs into the folder ``out`` and returns the pass's failed
    self-checks (None or [] when it has none). ``plan(run)``: its peak memory
    per rank, for a pass that runs the parent (None where this run's
    settings have it run none: solve without speed checks). ``sharded``: every rank of a
    torchrun job runs it (the others run on rank 0 while the rest wait).
    """

    name: str
    settings: tuple[str, ...]
    check: Callable[[Run], None]
    call: Callable[[Run, Path], list[str] | None]
    reads: tuple[str, ...] = ()
    outputs: dict[str, str] = field(default_factory=dict)
    also_reads: tuple[str, ...] = ()
    joins: tuple[str, ...] = ()
    plan: Callable[[Run], MemoryPlan | None] | None = None
    sharded: bool = False


@contextmanager
def locked_run_dir(workdir: Path, holder: str | None = None) -> Iterator[None]:
    """Hold the run directory for one command; a second command on it meanwhile is refused in one line.

    The lock is ``flock`` on ``<workdir>/.lock``, which the kernel drops when
    the process ends, however it ends: a killed command never leaves the run
    locked. ``holder`` names the command in the lock file besides its pid (the
    ranks of a torchrun job share one lock, ``hwopt.distributed.locked_for_job``).
    A run directory the command created and left holding nothing but the lock
    (it failed before any work, on bad input say) is removed again.
    """
    workdir = Path(workdir)
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise HwoptError(f"{workdir} is in use by another hwopt command ({holder}); wait for it to finish, "
                             "or use another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}{', ' + holder if holder else ''}\n")
        f.flush()
        try:
            yield
        finally:
            if created and [p.name for p in workdir.iterdir()] == [LOCK]:
                (workdir / LOCK).unlink()
                workdir.rmdir()
            fcntl.flock(f, fcntl.LOCK_UN)


def under_torchrun() -> bool:
    """Whether this process is one of several ranks torchrun started (it sets ``WORLD_SIZE``); known without
    torch, so a single process's error line imports none."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def cache_root() -> Path:
    """Where hwopt keeps what outlives a run: downloaded weights, the CPU's measured roofs (``$HWOPT_CACHE``)."""
    return Path(os.environ.get("HWOPT_CACHE", Path.home() / ".cache" / "hwopt"))


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file under a temporary name in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, READABLE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write a file to; renamed to ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(settings: dict, inputs: dict[str, str]) -> str:
    """sha256 of a pass's settings and of the content hashes of what it reads."""
    blob = json.dumps({"settings": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_manifest(pass_dir: Path) -> dict | None:
    try:
        return json.loads((Path(pass_dir) / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def output_hash(pass_dir: Path) -> str:
    """The content hash of a finished pass's outputs, recorded in its manifest."""
    manifest = read_manifest(pass_dir)
    return manifest["outputs_sha256"] if manifest else ""


def is_up_to_date(pass_dir: Path, fp: str) -> bool:
    manifest = read_manifest(pass_dir)
    return manifest is not None and manifest.get("fingerprint") == fp


def mark_not_up_to_date(pass_dir: Path, problems: list[str]) -> None:
    """Keep a finished pass's outputs (later passes may read them) but never skip it: it failed its checks."""
    manifest = read_manifest(pass_dir)
    manifest["fingerprint"] = None
    manifest["failed_checks"] = problems
    atomic_write_json(Path(pass_dir) / MANIFEST, manifest)


def partial_dir(pass_dir: Path) -> Path:
    """Where a pass builds its outputs until they are complete."""
    return Path(pass_dir).with_name(Path(pass_dir).name + ".partial")


def units_dir(pass_dir: Path) -> Path:
    """Where a pass keeps units of work that outlive a change to the inputs it only joins in (``kept_units``)."""
    return Path(pass_dir).with_name(Path(pass_dir).name + ".units")


def kept_units(pass_dir: Path, key: str) -> Path:
    """The pass's units folder (``units_dir``) for units of fingerprint ``key``: the units kept there by an
    earlier run with the same ``key`` stay, any other run's are cleared."""
    folder = units_dir(pass_dir)
    stamp = folder / FINGERPRINT
    if folder.exists() and not (stamp.is_file() and stamp.read_text() == key):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)
    return folder


@contextmanager
def staged_pass(pass_dir: Path, fp: str) -> Iterator[Path]:
    """The partial folder a pass writes into; swapped into place when the pass returns.

    A partial folder left by an interrupted run with the same fingerprint is
    kept (its finished units are reused); one with another fingerprint is
    cleared.
    """
    pass_dir = Path(pass_dir)
    partial = partial_dir(pass_dir)
    if partial.exists() and (partial / FINGERPRINT).is_file() and (partial / FINGERPRINT).read_text() != fp:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / FINGERPRINT).write_text(fp)
    yield partial
    files = sorted(p for p in partial.rglob("*") if p.is_file() and not p.name.startswith("."))
    for f in files:  # weights as readable as the run's other files (safetensors writes them 0600)
        f.chmod(READABLE)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(partial)}:{file_sha256(f)}\n".encode())
    atomic_write_json(partial / MANIFEST, {"fingerprint": fp, "outputs_sha256": digest.hexdigest(),
                                           "files": [str(f.relative_to(partial)) for f in files]})
    (partial / FINGERPRINT).unlink()
    old = pass_dir.with_name(pass_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if pass_dir.exists():
        pass_dir.rename(old)
    partial.rename(pass_dir)
    shutil.rmtree(old, ignore_errors=True)
