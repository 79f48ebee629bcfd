"""scripts/device_check.py --smoke: the accelerator check runs end to end on CPU (t at 256), so it
is ready the day a GPU is at hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support import reference

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not reference.reference_available(),
                                reason="needs torch, sam2 and hydra (the dev extra)")


def _smoke(out: Path, *sections: str) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"), "--smoke",
                           "--out", str(out), "--sections", *sections], capture_output=True,
                          text=True, timeout=600)
    report = json.loads((out / "device_check.json").read_text())
    errors = {k: v["error"] for k, v in report["sections"].items() if "error" in v}
    assert done.returncode == 0 and not errors, (errors, done.stderr[-3000:])
    assert list(report["sections"]) == list(sections)
    return report


def test_smoke_run_writes_the_parity_evaluation_and_annotation_sections(tmp_path):
    report = _smoke(tmp_path, "parity", "evaluation", "annotate")
    parity = report["sections"]["parity"]["rows"]
    assert parity["float32"]["embed_rel_error"] <= 1e-4
    assert parity["float32"]["mask_agreement_min"] >= 0.999
    assert report["sections"]["evaluation"]["rows"]["masks"] > 0
    assert report["sections"]["annotate"]["rows"]["persons"] > 0
    assert "Annotation: 4 images" in (tmp_path / "device_check.md").read_text()


@pytest.mark.slow  # 45 s of compiling: outside CI's 20 minutes (the script's own timing loops)
def test_smoke_run_times_the_encoder_and_decoder_and_trains(tmp_path):
    report = _smoke(tmp_path, "encoder", "decoder", "training")
    assert [r["batch"] for r in report["sections"]["encoder"]["rows"]] == [1, 2]
    assert report["sections"]["decoder"]["rows"]
    assert "| encoder batch |" in (tmp_path / "device_check.md").read_text()
    assert report["sections"]["training"]["rows"]["ours_images_per_s"] > 0
    assert "Training (128 px)" in (tmp_path / "device_check.md").read_text()
