"""Files and folders that readers see whole or not at all: written under a hidden temporary name
beside the target, then renamed over it. A crash, a full disk or a second process racing to write
the same target never leaves a half-written one behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a staging path beside ``path``; when the block ends without an error the staging
    file (fsynced) replaces ``path``, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        yield Path(staging)
        with open(staging, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def write_text_atomically(path: Path, text: str) -> None:
    with atomic_file(path) as staging:
        staging.write_text(text)


@contextmanager
def atomic_folder(target: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yields an empty staging folder beside ``target``; when the block ends without an error it
    becomes ``target``. An existing ``target`` is replaced, or with ``keep_existing`` kept (another
    process finished the same folder first: the staging copy is dropped)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            if keep_existing:
                return
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not (keep_existing and target.exists()):  # lost no race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
