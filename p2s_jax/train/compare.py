"""`p2s compare`: the training side of a sampler study, one table of mask AP for any number of
runs, as the paper's Table 1 lays it out (AP, AP50, AP75, APm, APl), and the held-out AP of
training workdirs against their step.

A run is a `p2s evaluate` summary (`*.summary.json`: its metrics) or a training workdir (its
`metrics.jsonl`: the held-out evaluations of `eval.every`; the row is the step of the best AP,
the one `p2s export --best` writes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from p2s_jax.train.metrics_writer import read_jsonl
from p2s_jax.utils.errors import InputError
from p2s_jax.utils.files import write_atomic
from p2s_jax.utils.charts import Series, line_chart

COLUMNS = ("AP", "AP50", "AP75", "APm", "APl")


class Compared(NamedTuple):
    """One run of a comparison."""

    label: str  # the file or folder name
    source: str  # "summary" or "workdir (step N)"
    metrics: dict  # COLUMNS -> value in [0, 1] (-1: no such persons)
    history: list  # [(step, AP)] of a workdir's held-out evaluations; [] for a summary


def read_run(path) -> Compared:
    """A `p2s evaluate` summary or a training workdir (see the module docstring).

    Raises:
      InputError: the path is neither, saying what each would hold.
    """
    path = Path(path)
    neither = (f"{path} is neither a p2s evaluate summary (a JSON file with 'metrics' AP, AP50, "
               "...) nor a training workdir (a folder whose metrics.jsonl holds held-out "
               "evaluations, eval.every > 0)")
    if path.is_dir():
        records = read_jsonl(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []
        evaluated = [r for r in records if "eval/AP" in r]
        if not evaluated:
            raise InputError(neither)
        best = max(evaluated, key=lambda r: (r["eval/AP"], r["step"]))
        return Compared(path.name, f"workdir (step {best['step']})",
                        {c: best.get(f"eval/{c}", -1.0) for c in COLUMNS},
                        [(r["step"], r["eval/AP"]) for r in evaluated])
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(neither) from None
    metrics = data.get("metrics") if isinstance(data, dict) else None
    if not isinstance(metrics, dict) or not all(c in metrics for c in COLUMNS):
        raise InputError(neither)
    return Compared(path.name.removesuffix(".summary.json"), "summary",
                    {c: metrics[c] for c in COLUMNS}, [])


def table(runs: list[Compared]) -> str:
    """One Markdown row per run, AP columns x 100 with one decimal ('-' where COCOeval has no
    such persons)."""
    header = ["run", "from", *COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        values = ["-" if run.metrics[c] < 0 else f"{100 * run.metrics[c]:.1f}" for c in COLUMNS]
        lines.append("| " + " | ".join([run.label, run.source, *values]) + " |")
    return "\n".join(lines)


def compare(paths, out=None) -> list[str]:
    """`p2s compare`: the runs of `paths` (`read_run`) -> the lines it prints: the table and,
    with `out`, the files written (the table as Markdown at `out`, the held-out AP of the
    workdirs against step as a PNG beside it)."""
    runs = [read_run(path) for path in paths]
    lines = [table(runs)]
    if out is not None:
        write_atomic(out, lines[0] + "\n")
        lines.append(f"table: {out}")
        if any(run.history for run in runs):
            plot = write_history_plot(Path(out).with_suffix(".png"), runs)
            lines.append(f"held-out AP against step: {plot}")
    return lines


def write_history_plot(path, runs: list[Compared]) -> Path:
    """Held-out AP against step, one line per workdir (PNG, written atomically)."""
    histories = [r for r in runs if r.history]
    last = max(step for r in histories for step, _ in r.history)
    return line_chart(path, [Series(r.label, r.history) for r in histories],
                      [round(v) for v in np.linspace(0, last, 5)],
                      title="held-out mask AP against training step", x_label="step",
                      y_label="AP", y_scale=100.0)
