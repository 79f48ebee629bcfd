"""`p2s review FILE --apply decisions.json --out CURATED.json`: a person's decisions from the
review page, applied as a curated copy of the annotate output.

The decisions file is what the page exports, `{"source": "<file name>", "fingerprint":
"sha256:...", "decisions": {"<annotation id>": "accept" | "reject"}}`; a file written by hand
may hold `decisions` alone. A fingerprint of another file is refused (the ids would name other
persons), as are ids the file lacks and values other than accept / reject.

The copy keeps every person and field. Each decided person gets `p2s.review` ("accept" or
"reject"); a rejected one gets `p2s.status = "rejected"`, its status before in
`p2s.status_before_review`. Training keeps only the statuses of `data.statuses` (`ok` by
default), so rejected persons are left out like `low_iou` ones.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

from p2s_jax.review.cards import fingerprint
from p2s_jax.utils.errors import InputError
from p2s_jax.utils.files import read_json, write_atomic

DECISIONS = ("accept", "reject")
REJECTED = "rejected"


def read_decisions(path, reviewed_path) -> dict[int, str]:
    """annotation id -> decision, from the decisions file `path` made for `reviewed_path`.

    Raises:
      InputError: another file's fingerprint, a malformed file or entry (naming it).
    """
    path = Path(path)
    data = read_json(path, "decisions file")
    if not isinstance(data, dict) or not isinstance(data.get("decisions"), dict):
        raise InputError(f"{path}: expected {{\"decisions\": {{\"<annotation id>\": \"accept\" "
                         "| \"reject\"}}} (the review page's export)")
    if "fingerprint" in data and data["fingerprint"] != fingerprint(reviewed_path):
        raise InputError(f"{path} was made for another file ({data.get('source', '?')}, "
                         f"{data['fingerprint']}), not {reviewed_path}: review that file, or "
                         "drop the fingerprint to apply the ids as they are")
    decisions = {}
    for key, value in data["decisions"].items():
        if value not in DECISIONS:
            raise InputError(f"{path}: decisions[{key!r}] is {value!r}; expected one of "
                             f"{list(DECISIONS)}")
        try:
            decisions[int(key)] = value
        except ValueError:
            raise InputError(f"{path}: decisions key {key!r} is not an annotation id") from None
    return decisions


def apply_decisions(data: dict, decisions: dict[int, str], where: str = "the file"
                    ) -> tuple[dict, Counter]:
    """The curated copy of an annotate output `data` (module docstring) -> (copy, counts of
    the decisions applied).

    Raises:
      InputError: decisions naming ids that `data` lacks.
    """
    ids = {a.get("id") for a in data.get("annotations", []) if isinstance(a, dict)}
    unknown = sorted(set(decisions) - ids)
    if unknown:
        raise InputError(f"the decisions name {len(unknown)} annotation ids that {where} lacks: "
                         f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    curated = copy.deepcopy(data)
    counts = Counter()
    for ann in curated["annotations"]:
        decision = decisions.get(ann.get("id"))
        if decision is None:
            continue
        p2s = ann.setdefault("p2s", {})
        p2s["review"] = decision
        if decision == "reject" and p2s.get("status") != REJECTED:
            p2s["status_before_review"] = p2s.get("status")
            p2s["status"] = REJECTED
        counts[decision] += 1
    return curated, counts


def write_curated(reviewed, decisions_path, out) -> list[str]:
    """Applies the decisions file to the annotate output `reviewed` and writes the copy to
    `out` atomically -> the lines to print."""
    data = read_json(reviewed, "annotated file")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise InputError(f"{reviewed}: --apply takes a p2s annotate output (a COCO-format "
                         "file); decisions of an error analysis have nothing to curate")
    curated, counts = apply_decisions(data, read_decisions(decisions_path, reviewed),
                                      str(reviewed))
    write_atomic(out, json.dumps(curated))
    return [f"{counts['accept']} accepted, {counts['reject']} rejected (p2s.status "
            f"'{REJECTED}', left out of training by data.statuses), "
            f"{len(curated['annotations']) - sum(counts.values())} not decided",
            f"curated: {out}"]
