"""File-system helpers for writes that a crash must never half-finish, and for output folders
that must never swallow what effllm did not write.

Every writer (prepare, train's run directory, export-hf, card, the benchmarks) claims its output
through `claim_output_dir` (or `claim_output_file`): a new or empty location is taken; one that
holds an earlier output of the same writer is replaced only with --overwrite and only when it
holds nothing else; anything else is refused, so no user file is ever deleted. Temporary folders
get unique names (`new_temp_dir`), so they cannot collide with a user's folder either.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from effllm.errors import OutputError


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and flush it to disk before returning."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete directory `new` at `target`. An existing `target` is first moved aside to a
    unique hidden name (so globs over visible names never see it, and no other folder is touched)
    and removed only after the swap."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old)  # onto the empty folder just made: an atomic rename on POSIX
        os.replace(new, target)
        shutil.rmtree(old)
    else:
        os.replace(new, target)
    fsync_dir(target.parent)


def new_temp_dir(target: Path) -> Path:
    """A new, uniquely named hidden folder beside `target` (same file system, so a rename moves it
    into place), for a writer to fill before `replace_dir`. Made by mkdir, so its mode follows the
    umask as any folder's does (mkdtemp's 0700 would make every output private once renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def resolved(path: str | Path) -> Path:
    """The absolute, normalised path (`.`, `..`, `~` and symlinks resolved)."""
    return Path(path).expanduser().resolve()


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def refuse_overlap(out: Path, inputs: Iterable[str | Path], option: str = "--out", what: str = "source") -> None:
    """Refuse an output folder equal to, inside, or around one of the inputs: writing there would
    mix the output into the input, and replacing it would delete the input."""
    for item in inputs:
        src = resolved(item)
        if out == src or out.is_relative_to(src):
            raise OutputError(f"{option} {out} lies inside the {what} {src}: choose a folder outside it")
        if src.is_relative_to(out):
            raise OutputError(f"the {what} {src} lies inside {option} {out}, which the output would replace: "
                              "choose a folder that does not contain it")


def claim_output_dir(out: str | Path, *, writer: str, owned: Iterable[str], is_ours: Callable[[Path], bool],
                     overwrite: bool, option: str = "--out") -> Path:
    """Check, before any work, that `writer` may write the folder `out`; returns it resolved.

    - a new or empty folder is taken;
    - a folder that `is_ours` recognises as an earlier output of `writer` is replaced only with
      `overwrite`, and only when it holds nothing but the names in `owned`;
    - anything else (a file, a folder of other content) is refused.
    """
    out = resolved(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {out} is a file, not a folder: choose a new folder")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not names:
        return out
    if not is_ours(out):
        raise OutputError(f"{option} {out} is not empty ({_listing(names)}) and was not written by {writer}, which never "
                          f"replaces a folder it did not write: choose a new or empty folder")
    if not overwrite:
        raise OutputError(f"{out} already holds the output of an earlier {writer}: pass --overwrite to replace it, "
                          f"or choose another {option}")
    foreign = [n for n in names if n not in set(owned)]
    if foreign:
        raise OutputError(f"{out} holds files that {writer} did not write ({_listing(foreign)}), which --overwrite "
                          f"would delete: move them out first, or choose another {option}")
    return out


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` through a unique temporary file beside it and a rename: readers see the old
    file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
