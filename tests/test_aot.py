"""p2s aot: the project's programs compiled for a TPU slice and for GPUs on this CPU machine.

TPU needs libtpu (`pip install "p2s_jax[tpu]"`, about 210 MB), GPU the CUDA wheels (about
5.5 GB, `pip install "jax[cuda12]"`) and XLA's H100 description in `../shared/data/gpu`; each
test skips, saying so, where they are absent (CI installs neither: run them with
`pip install -e ".[tpu]" && python -m pytest tests/test_aot.py`).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
H100 = ROOT.parent / "shared" / "data" / "gpu" / "h100_sxm.txtpb"
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA = any(importlib.util.find_spec(name) is not None
               for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def _aot(*args: str, env: dict | None = None) -> list[dict]:
    """Runs `p2s aot` in a fresh process (libtpu and the CUDA plugin are process-wide)."""
    import json

    done = subprocess.run([sys.executable, "-m", "p2s_jax.cli", "aot", *args],
                          capture_output=True, text=True, timeout=1800,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install "
                                           "'p2s_jax[tpu]'): nothing compiles for TPU here")
def test_tiny_train_step_and_encoder_compile_for_v5e():
    lines = _aot("--target", "v5e:2x2", "--programs", "encoder", "train", "--model", "t",
                 "--image-size", "128", "--train-preset", "tiny", "--batch", "1")
    assert [line["program"] for line in lines] == ["encoder", "train"]
    for line in lines:
        assert line["compiled"], line
        assert line["chips"] == 4 and line["fits"]
        assert 0 < line["memory_per_chip_bytes"] < line["hbm_per_chip_bytes"]
        assert line["flops_per_chip"] > 0 and line["optimal_seconds"] > 0
        assert 0 < line["mfu"] < 1
    assert lines[1]["paper_training_hours"] > 0


@pytest.mark.skipif(not (HAS_CUDA and H100.is_file()),
                    reason=f"the CUDA wheels (pip install 'jax[cuda12]') or {H100} are missing")
def test_gpu_programs_use_cudnn_flash_attention_and_no_cpu_loops():
    """On the compiled H100 programs in bf16 with attention=auto's GPU choice: every attention
    is a cuDNN flash-attention call, no while loop is left of the CPU chunking, and the train
    step at the device check's batch fits an 80 GB GPU."""
    lines = _aot("--target", "h100", "--gpu-target", str(H100), "--programs", "encoder",
                 "decode", "train", "--model", "b+", "--batch", "8", env={"JAX_PLATFORMS": "cpu"})
    by_program = {line["program"]: line for line in lines}
    for program in ("encoder", "decode", "train"):
        line = by_program[program]
        assert line["compiled"], line
        assert line["cudnn_attention_calls"] > 0, line
    assert by_program["encoder"]["while_loops"] == 0
    assert by_program["decode"]["while_loops"] == 0
    assert by_program["train"]["fits"]
