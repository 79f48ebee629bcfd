"""Files in and out: JSON reads that name the file and the position of an error, atomic writes,
and the one rule every command follows for its outputs (`check_outputs`).

The output rule: every output path is checked before any work starts. An output that is one of
the command's inputs is always refused; an output that already exists is refused unless the
user passes `--overwrite` (then it is replaced atomically, never left half-written); an output
whose folder cannot be created, or a file output that is a folder, is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Type

from p2s_jax.utils.errors import InputError, MissingFileError


class OutputError(InputError):
    """An output path the command may not write (an input, an existing file, a folder)."""


def read_json(path: str | os.PathLike, what: str = "JSON file",
              error: Type[InputError] = InputError) -> Any:
    """Parses the JSON file `path` (a `what`); a missing file raises `MissingFileError`, a
    syntax or encoding error raises `error` naming the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}"
                               + (" (it is a directory)" if path.is_dir() else ""))
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON: {e.msg} at line {e.lineno}, column {e.colno} "
                    f"(character {e.pos})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e})") from None


def write_atomic(path: str | os.PathLike, text: str | bytes) -> Path:
    """Writes `text` to `path` through a temporary file renamed into place (fsync'ed first), so
    that `path` holds either its old content or the whole new one; the temporary file is removed
    when the write fails. The file gets the user's umask (0666 & ~umask), as `open` gives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any, indent: int | None = None) -> Path:
    """`data` as JSON at `path`, written atomically (`write_atomic`)."""
    return write_atomic(path, json.dumps(data, indent=indent))


def summary_path(out: str | os.PathLike) -> Path:
    """Where a command writes the summary of its output `out`: `<out stem>.summary.json` beside
    it (`p2s evaluate` without --summary, `p2s annotate`)."""
    out = Path(out)
    return out.with_name(out.stem + ".summary.json")


def _same_path(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_outputs(outputs: Mapping[str, str | os.PathLike | None],
                  inputs: Iterable[str | os.PathLike | None] = (), *, overwrite: bool = False,
                  folders: Iterable[str] = ()) -> None:
    """Checks the outputs of a command before it starts (the module's output rule).

    Args:
      outputs: option name (e.g. '--out') -> the path it names (None: not asked for).
      inputs: the command's input files and folders (None entries are ignored).
      overwrite: existing outputs may be replaced.
      folders: the option names whose output is a folder (an existing empty folder is free).

    Raises:
      OutputError: naming the option and the path.
    """
    inputs = [Path(p) for p in inputs if p is not None]
    folders = set(folders)
    for option, path in outputs.items():
        if path is None:
            continue
        path = Path(path)
        for source in inputs:
            if _same_path(path, source):
                raise OutputError(f"{option} {path} is an input of this command: write the "
                                  "output elsewhere (no command writes over its input)")
        is_folder = option in folders
        if path.is_dir() and not is_folder:
            raise OutputError(f"{option} {path} is a folder: name a file")
        if path.exists() and not path.is_dir() and is_folder:
            raise OutputError(f"{option} {path} is a file: name a folder")
        taken = path.exists() and not (is_folder and not any(path.iterdir()))
        if taken and not overwrite:
            what = "a non-empty folder" if is_folder else "a file"
            raise OutputError(f"{option} {path} already exists ({what}): pass --overwrite to "
                              "replace it, or choose another path")
        parent = next((p for p in path.absolute().parents if p.exists()), None)
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
            raise OutputError(f"{option} {path}: cannot create it under {parent} (not a "
                              "writable folder)")


def replace_folder(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Puts the finished folder `staging` in the place of `target` (`--overwrite` of a folder
    output): the old folder is renamed aside first and removed last, so that `target` is at
    every moment either the old folder or the new one."""
    staging, target = Path(staging), Path(target)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def listing(folder: str | os.PathLike) -> set[str] | None:
    """The names in `folder` (None: it does not exist), to tell later what a command left."""
    folder = Path(folder)
    return set(os.listdir(folder)) if folder.is_dir() else None


def what_was_left(folder: str | os.PathLike, before: set[str] | None) -> str:
    """What a command stopped midway left in `folder` since `listing` gave `before`."""
    folder = Path(folder)
    now = listing(folder) or set()
    new = sorted(f"{n}/" if (folder / n).is_dir() else n for n in now - (before or set()))
    if not new:
        return "nothing was written"
    return f"left in {folder}{' (new)' if before is None else ''}: {', '.join(new)}"


def check_folder(path: str | os.PathLike, what: str) -> Path:
    """`path` as an existing folder; the error says whether it is missing or a file."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{what} {path} is a file, not a folder: name the folder that holds "
                         "the images")
    raise MissingFileError(f"{what} {path}: folder not found")
