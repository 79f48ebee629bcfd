"""Every `p2s` command the documentation shows (README.md, docs/*.md) parses with the real
argument parser and is runnable as written: shell continuations joined, the docs' shell
functions expanded, variables given placeholder values, commands inside quoted strings
(`gcloud ... --command "p2s train ..."`) and the command cells of docs/reproduce.md's tables
(those naming a --checkpoint, each given to the table's `p2s evaluate` shorthand) included. A `p2s train` line must name its
data (generated, or `data.data_dir` and `data.manual_dir`) unless it resumes a run; a `p2s
evaluate` line must say where its poses come from and give settings that build."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from p2s_jax import cli
from p2s_jax.train import samplers
from p2s_jax.train.config import load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
FUNCTION = re.compile(r"^(\w+)\(\)\s*\{\s*(p2s .*?)\s*\"\$@\";\s*\}$")
VARIABLE = re.compile(r"\$\{?(\w+)\}?")
SEPARATORS = {"&&", "||", ";", "|"}
# the shorthand of docs/reproduce.md's table cells: `p2s evaluate` on a dataset
TABLE_COMMAND = ["p2s", "evaluate", "--annotations", "gt.json", "--images", "images", "--out",
                 "out.json"]


def _substitute(text: str) -> str:
    return VARIABLE.sub(lambda m: "0" if m.group(1) == "RANDOM" else f"/var/{m.group(1)}",
                        text)


def _shell_lines(block: str) -> list[str]:
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _commands(line: str, functions: dict) -> list[list[str]]:
    """The p2s commands of one shell line (functions expanded, quoted commands included)."""
    match = FUNCTION.match(line)
    if match:
        functions[match.group(1)] = shlex.split(_substitute(match.group(2)), comments=True)
        return []
    try:
        tokens = shlex.split(_substitute(line), comments=True)
    except ValueError:
        return []
    found, current, redirected = [], [], False
    for token in tokens + [";"]:
        if redirected:  # the target of a redirection
            redirected = False
            continue
        if re.fullmatch(r"\d?>>?(&\d)?", token):  # >, >>, 2>, 2>&1
            redirected = "&" not in token
            continue
        if token in SEPARATORS:
            if current:
                found.append(current)
            current = []
        else:
            current.append(token)
    commands = []
    for words in found:
        if words[0] in functions:
            words = functions[words[0]] + words[1:]
        if words[0] == "p2s":
            commands.append(words)
        for word in words[1:]:  # gcloud ... --command "p2s train ..."
            if word.startswith("p2s ") or " p2s " in word:
                commands += _commands(word[word.index("p2s "):], functions)
    return commands


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every p2s command of the docs."""
    found = []
    for path in DOCS:
        text = path.read_text()
        functions: dict = {}
        for block in FENCE.findall(text):
            for line in _shell_lines(block):
                found += [(f"{path.name}: {line[:80]}", words)
                          for words in _commands(line, functions)]
        if path.name == "reproduce.md":
            for row in re.findall(r"^\|.*\|$", text, re.M):
                for cell in re.findall(r"`(--[^`]*--checkpoint[^`]*|--checkpoint[^`]*)`", row):
                    words = TABLE_COMMAND + shlex.split(_substitute(cell.replace("DET",
                                                                                 "det.json")))
                    found.append((f"reproduce.md table: {cell}", words))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands_of_every_kind():
    kinds = {words[1] for _, words in COMMANDS}
    assert {"segment", "evaluate", "train", "export", "annotate", "prepare", "curve", "aot",
            "init"} <= kinds, kinds
    assert len(COMMANDS) > 60


@pytest.mark.parametrize("where, words", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_runs_as_written(where, words, capsys, monkeypatch):
    try:
        args = cli.build_parser().parse_args(words[1:])
    except SystemExit:
        pytest.fail(f"{where}: argparse refuses it: {capsys.readouterr().err.strip()}")
    if args.command == "evaluate":
        cli.inference_config(args, ground_truth=args.gt_keypoints)
    if args.command in ("segment", "annotate"):
        cli.inference_config(args, ground_truth=False)
    if args.command == "train" and args.config is not None:
        if args.imports:  # the module the docs define: their python blocks
            doc = next(p for p in DOCS if p.name == where.split(":")[0])
            monkeypatch.setattr(samplers, "_SAMPLERS", dict(samplers._SAMPLERS))
            namespace: dict = {}
            for block in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S):
                exec(compile(block, str(doc), "exec"), namespace)
        config = load_config(args.config, parse_overrides(args.overrides))
        data = config.data
        assert data.synthetic_images or (data.data_dir and data.manual_dir) or args.resume, (
            f"{where}: names no training data (data.data_dir and data.manual_dir)")
