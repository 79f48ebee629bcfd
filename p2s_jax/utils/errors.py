"""The project's error types: an expected failure whose message says everything.

`p2s` prints an `Error` as one line (file, key, entry, shape or value named) and exits with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class Error(Exception):
    """An expected failure of a p2s_jax command; its message names the cause."""


class InputError(Error, ValueError):
    """A malformed or unsuitable input: a file, an argument, an entry of a dataset."""


class MissingFileError(InputError, FileNotFoundError):
    """An input file or folder that does not exist."""
