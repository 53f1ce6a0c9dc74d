"""Outputs that appear whole or not at all: atomic file writes and run folders replaced whole.

A reader (or a rerun after a kill) sees the old file or the new one, never half of one: files are
written under a temporary name, fsynced, renamed, and the folder fsynced, so a power cut does not
leave a renamed but empty file either. A run folder that replaces an existing one (``--overwrite``)
is written into a staging folder beside it and swapped in only when finished: the old one is never
half-overwritten. A process killed midway leaves its hidden staging folder behind; the next run
preparing the same folder removes it (once its process is gone).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from peftlab.errors import UserError


def fsync(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, e.g. a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (before renaming it into place)."""
    for path in sorted(Path(folder).rglob("*"), reverse=True):  # files before the folders holding them
        fsync(path)
    fsync(folder)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """``write_atomic`` for bytes (a plot, say)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)


def write_json(path: Path, data) -> None:
    """``data`` as indented JSON, atomically (values JSON cannot hold are written as ``str``)."""
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


RUN_MARKER = "run.json"


def holds_run(path: Path) -> bool:
    return (path / RUN_MARKER).is_file()


@dataclass
class RunFolder:
    """Where a run writes (``work``) and where it must end up (``final``)."""

    final: Path
    work: Path
    created: bool = False  # this run made the folder (so it may remove it if it fails before writing run.json)

    @classmethod
    def prepare(cls, out: str | Path, *, overwrite: bool, resume: bool) -> "RunFolder":
        final = Path(out)
        _clean_stale_staging(final)
        if resume:
            if final.is_dir() and not any(final.iterdir()):  # a run stopped before it wrote anything
                return cls(final, final)
            if not holds_run(final):
                raise UserError(f"--resume: {final} holds no run to continue (no {RUN_MARKER}); drop --resume to start one")
            return cls(final, final)
        if final.exists() and not final.is_dir():
            raise UserError(f"--out {final} is a file; give a folder path")
        if final.is_dir() and any(final.iterdir()):
            if not overwrite:
                what = "a run" if holds_run(final) else "files"
                raise UserError(f"--out {final} already holds {what}; pass --overwrite to replace it, or --resume to continue a run")
            work = final.with_name(f".{final.name}.partial-{os.getpid()}")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            return cls(final, work)
        created = not final.exists()
        final.mkdir(parents=True, exist_ok=True)
        return cls(final, final, created)

    def commit(self) -> None:
        """Move a staged run into place, replacing the old one only now."""
        if not self.staged:
            return
        fsync_tree(self.work)
        old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
        os.replace(self.final, old)
        os.replace(self.work, self.final)
        fsync(self.final.parent)
        shutil.rmtree(old, ignore_errors=True)

    @property
    def staged(self) -> bool:
        """Written beside an existing run that it replaces only when finished (``--overwrite``)."""
        return self.work != self.final

    def abandon(self) -> None:
        """After a failure: drop a staging folder (the old run stays), or a folder this run created while it
        holds nothing yet; a run that wrote its ``run.json`` keeps its folder (``--resume`` continues it)."""
        if self.staged or (self.created and not holds_run(self.work)):
            shutil.rmtree(self.work, ignore_errors=True)


def _clean_stale_staging(final: Path) -> None:
    """Remove what a killed ``--overwrite`` left beside ``final``: ``.NAME.partial-PID`` staging folders and
    ``.NAME.old-PID`` (the replaced run, put back when the kill came between the two renames of ``commit``)."""
    if not final.parent.is_dir():
        return
    for kind in ("old", "partial"):
        for path in final.parent.glob(f".{glob.escape(final.name)}.{kind}-*"):
            pid = path.name.rpartition("-")[2]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not final.exists():
                os.replace(path, final)
            else:
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# ----------------------------------------------------------------------------------------------
# Output paths, checked before any work starts


def check_output_path(path: str | Path, flag: str, inputs: list[tuple[str, str | Path | None]] = (), *,
                      writes: tuple[str, ...] = (), replaces_folder: bool = False) -> Path:
    """Refuse an output a command could not write, or one that would destroy one of its own inputs, before
    any work starts (a failure after an hour of generation, or a merged model written over its base, loses more).

    ``path`` is a file the command writes (``score --json``); with ``writes`` a folder it writes those files
    into (``eval --out``: predictions.jsonl, metrics.json); with ``replaces_folder`` a folder it creates or
    replaces whole (``merge --out``), so an input inside it, or a folder holding it, counts as destroyed too.
    ``inputs`` are ``(flag, path)`` pairs of what the command reads; names that are no path (hub ids, aliases)
    are skipped. Missing parent folders are fine (the command creates them) when the place is writable.
    """
    import tempfile

    given = Path(path).expanduser()
    target = Path(os.path.abspath(given))
    wants_folder = bool(writes) or replaces_folder
    if wants_folder and target.exists() and not target.is_dir():
        raise UserError(f"{flag} {given} is a file; give a folder path")
    if not wants_folder and target.is_dir():
        raise UserError(f"{flag} {given} is a folder; give a file path")
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {given} lies under {existing}, which is a file, not a folder; choose another path")
    place = target if writes and target.is_dir() else existing  # a folder replaced whole is staged beside it
    try:  # writing a file is the one test that also holds for root, read-only mounts and /proc
        fd, probe = tempfile.mkstemp(prefix=".peftlab-write-test-", dir=place)
    except OSError as e:
        raise UserError(f"{flag} {given}: cannot write in {place} ({e.strerror}); choose a writable place") from None
    os.close(fd)
    os.unlink(probe)
    written = [target / name for name in writes] if writes else [target]
    for input_flag, input_path in inputs:
        if input_path is None or not Path(input_path).expanduser().exists():
            continue
        source = Path(input_path).expanduser().resolve()
        for out in written:
            if out.resolve() == source or (out.exists() and os.path.samefile(out, source)):
                raise UserError(f"{flag} {given} would overwrite the {input_flag} input {input_path}; "
                                f"choose another path for {flag}")
        if replaces_folder and source.is_relative_to(target.resolve()):
            raise UserError(f"{flag} {given} would replace the folder holding the {input_flag} input {input_path}; "
                            f"choose another path for {flag}")
        if replaces_folder and target.resolve().is_relative_to(source):
            raise UserError(f"{flag} {given} lies inside the {input_flag} input {input_path}; "
                            f"choose a path outside it for {flag}")
    return given
