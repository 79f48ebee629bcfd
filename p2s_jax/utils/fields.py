"""Command-line options from a config dataclass's own words: each field's documentation, read
from the ``Attributes:`` section of the class docstring (Google style), and its default, so an
option says and defaults to what the config does."""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping
from typing import Any

_ENTRY = re.compile(r"^(\w+): (.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """name -> the text the ``Attributes:`` section of the dataclass `cls` gives each field
    (continuation lines joined by spaces).

    Raises:
      ValueError: a field is not documented there.
    """
    lines = (inspect.getdoc(cls) or "").splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.strip() == "Attributes:"),
                 len(lines))
    docs: dict[str, str] = {}
    name, indent = None, None
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break
        entry = _ENTRY.match(line.strip())
        if depth == indent and entry:
            name = entry.group(1)
            docs[name] = entry.group(2)
        elif name:
            docs[name] += " " + line.strip()
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
    if missing:
        raise ValueError(f"{cls.__name__}'s docstring documents no field {missing}")
    return docs


def field_options(cls: type, options: Mapping[str, str], unset: bool = False
                  ) -> list[tuple[str, dict[str, Any]]]:
    """(option, argparse keywords) that set fields of the dataclass `cls`: `options` maps an
    option ("--min-iou") to the field it sets ("min_iou"); each option's dest is the field, its
    type the field's default's, its help the field's documentation. Its default is the field's,
    or None with `unset` (the option is applied only when given, over a preset)."""
    docs = field_docs(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return [(option, {"dest": name, "metavar": option[2:].upper().replace("-", "_"),
                      "type": type(defaults[name]),
                      "default": None if unset else defaults[name],
                      "help": docs[name] if unset else
                      f"{docs[name].rstrip('.')} (default {defaults[name]})"})
            for option, name in options.items()]


def field_values(cls: type, values: Mapping[str, Any], **given) -> Any:
    """An instance of the dataclass `cls` with the fields `values` holds (a parsed command
    line's `vars`), and `given`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names and k not in given}, **given)
