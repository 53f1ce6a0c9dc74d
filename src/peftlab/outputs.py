"""Outputs that appear whole or not at all: atomic file writes and run folders replaced whole.

A reader (or a rerun after a kill) sees the old file or the new one, never half of one. A run
folder that replaces an existing one (``--overwrite``) is written into a staging folder beside it
and swapped in only when finished: the old one is never half-overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from peftlab.errors import UserError


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    created: bool = False  # this run made the folder (so it may remove it if it fails before a checkpoint)

    @classmethod
    def prepare(cls, out: str | Path, *, overwrite: bool, resume: bool) -> "RunFolder":
        final = Path(out)
        if resume:
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
        if self.work == self.final:
            return
        old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
        os.replace(self.final, old)
        os.replace(self.work, self.final)
        shutil.rmtree(old, ignore_errors=True)

    def abandon(self, resumable: bool = False) -> None:
        """After a failure: drop a staging folder, or a folder this run created unless it can be resumed."""
        if self.work != self.final:
            shutil.rmtree(self.work, ignore_errors=True)
        elif self.created and not resumable:
            shutil.rmtree(self.work, ignore_errors=True)
