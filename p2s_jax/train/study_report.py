"""What a sampler study (`train.study`) writes, all from `--out PLOT.png`: the plot (one curve
per checkpoint x sampler, the mean over seeds with the range over seeds as a band), `PLOT.json`
(the runs with their per-person IoUs) and `PLOT.md` (a Markdown table that pastes into a paper
or an issue as it is)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from p2s_jax.utils.files import write_atomic, write_json
from p2s_jax.utils.charts import Series, line_chart

def outputs(plot) -> dict[str, Path]:
    """The files of a study written from `--out PLOT.png`: plot, json, table, and the folder of
    its kept runs."""
    plot = Path(plot)
    return {"--out": plot, "json": plot.with_suffix(".json"), "table": plot.with_suffix(".md"),
            "runs": plot.with_name(plot.stem + ".runs")}


def groups(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(checkpoint, sampler) -> its runs (one per seed), in the study's order."""
    out: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        out.setdefault((run["checkpoint"], run["sampler"]), []).append(run)
    return out


def _over_seeds(values: list) -> str:
    """'0.712' for one run, '0.712 ± 0.004' (mean ± standard deviation) for several."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def table(runs: list[dict], points: int) -> str:
    """Rows checkpoint x sampler: mIoU@1, @3, @5, @K, NoC@85, NoC@90, NoF@90 (mean ± std over
    seeds)."""
    ks = [k for k in (1, 3, 5) if k < points] + [points]
    header = (["checkpoint", "sampler", "seeds"] + [f"mIoU@{k}" for k in ks]
              + ["NoC@85", "NoC@90", "NoF@90"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (checkpoint, sampler), group in groups(runs).items():
        cells = [checkpoint, sampler, str(len(group))]
        cells += [_over_seeds([r["miou"][k - 1] for r in group]) for k in ks]
        cells += [_over_seeds([r["noc"][t] for r in group]) for t in ("85", "90")]
        cells.append(_over_seeds([float(r["nof"]["90"]) for r in group]).replace(".000", ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(path, runs: list[dict], points: int, title: str) -> Path:
    """mIoU after each point, one line per checkpoint x sampler (mean over seeds, the range over
    seeds as a band), axes from 0 to 1, a legend; PNG written atomically."""
    series = []
    for (checkpoint, sampler), group in groups(runs).items():
        curves = np.asarray([[np.nan if v is None else v for v in r["miou"]] for r in group])
        ks = range(1, points + 1)
        band = (list(zip(ks, curves.min(0), curves.max(0))) if len(group) > 1 else None)
        seeds = f" ({len(group)} seeds)" if len(group) > 1 else ""
        series.append(Series(f"{checkpoint} {sampler}{seeds}", list(zip(ks, curves.mean(0))),
                             band))
    return line_chart(path, series, list(range(1, points + 1)), title=title, x_label="point",
                      y_label="mean IoU")


def summary_lines(runs: list[dict], points: int, files: dict[str, Path]) -> list[str]:
    """What `p2s curve` prints: each curve (the mean over seeds), the table, the files."""
    lines = []
    for (checkpoint, sampler), group in groups(runs).items():
        curve = np.mean([[np.nan if v is None else v for v in r["miou"]] for r in group], axis=0)
        persons = len(group[0]["persons"])
        lines.append(f"{checkpoint} {sampler} ({persons} persons): mean IoU after each point: "
                     + " ".join(f"{v:.4f}" for v in curve))
    return lines + ["", table(runs, points), "",
                    f"plot: {files['--out']}\ndata: {files['json']}\ntable: {files['table']}"]


def write_study(plot, runs: list[dict], points: int, thresholds, title: str) -> list[str]:
    """The plot, PLOT.json ({"points", "thresholds", "runs"}) and PLOT.md -> what `p2s curve`
    prints (`summary_lines`)."""
    files = outputs(plot)
    write_plot(files["--out"], runs, points, title)
    write_json(files["json"], {"points": points, "thresholds": list(thresholds), "runs": runs})
    write_atomic(files["table"], table(runs, points) + "\n")
    return summary_lines(runs, points, files)
