"""JSON files in and out: reads that name the file and the position of an error, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Type

from p2s_jax.utils.errors import InputError, MissingFileError


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
    that `path` holds either its old content or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(text.encode("utf-8") if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, data: Any, indent: int | None = None) -> Path:
    """`data` as JSON at `path`, written atomically (`write_atomic`)."""
    return write_atomic(path, json.dumps(data, indent=indent))
