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

from support.shared import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
H100 = SHARED_DATA / "gpu" / "h100_sxm.txtpb"
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
def test_tiny_train_step_encoder_and_blocks_compile_for_v5e():
    from p2s_jax.model.configs import get_config
    from p2s_jax.model.hiera import block_layout

    lines = _aot("--target", "v5e:2x2", "--programs", "encoder", "train", "blocks", "--model",
                 "t", "--image-size", "128", "--train-preset", "tiny", "--batch", "1", "--top", "3")
    layout = block_layout(get_config("t", 128).trunk)
    assert [line["program"] for line in lines] == ["encoder", "train"] + ["blocks"] * len(layout)
    blocks = lines[2:]
    assert [(b["block"], b["window"], b["dim_out"]) for b in blocks] == [
        (i, layer["window_size"], layer["dim_out"]) for i, layer in enumerate(layout)]
    assert [b["side"] for b in blocks][:2] == [32, 32]  # 128 px / patch stride 4, q-pool after
    # the blocks are part of the encoder: their FLOPs are most, not all, of its FLOPs
    assert 0.5 * lines[0]["flops_per_chip"] < sum(b["flops_per_chip"] for b in blocks) \
        < lines[0]["flops_per_chip"]
    for line in lines:
        top = line["top_instructions"]
        assert len(top) == 3 and all(0 < t["share"] <= 1 for t in top)
        assert [t["cycles"] for t in top] == sorted((t["cycles"] for t in top), reverse=True)
        assert sum(t["share"] for t in top) <= 1 + 1e-9
    for line in lines:
        assert line["compiled"], line
        assert line["chips"] == 4 and line["fits"]
        assert 0 < line["memory_per_chip_bytes"] < line["hbm_per_chip_bytes"]
        assert line["flops_per_chip"] > 0 and line["optimal_seconds"] > 0
        assert 0 < line["mfu"] < 1 and 0 < line["hfu"] < 1
        # MFU counts the architecture's own FLOPs (`model.flops`), HFU XLA's of the program
        assert line["mfu"] / line["hfu"] == pytest.approx(
            line["model_flops_per_chip"] / line["flops_per_chip"])
    assert lines[1]["paper_training_hours"] > 0
    assert "paper_training_hours" not in lines[0] and "paper_training_hours" not in blocks[0]


@pytest.mark.skipif(not (HAS_CUDA and H100.is_file()),
                    reason=f"the CUDA wheels (pip install 'jax[cuda12]') or {H100} are missing")
def test_gpu_programs_use_cudnn_flash_attention_and_no_cpu_loops():
    """Every program the CLI runs compiles for an H100 at the batch sizes it uses, in bf16 with
    attention=auto's GPU choice: the Predictor's programs (`p2s segment`) for one photo, the
    evaluator's and annotator's steps at 1 and at their default 8 images per GPU, the paper
    train step at 1 image per GPU (8 GPUs) and 8 (one GPU), and the tiny preset's step. Every
    bf16 attention is a cuDNN flash-attention call (the tiny preset's float32 takes XLA's path:
    cuDNN has no float32), no while loop is left of the CPU chunking, and everything fits an
    80 GB GPU."""
    gpu = ("--target", "h100", "--gpu-target", str(H100))
    env = {"JAX_PLATFORMS": "cpu"}
    lines = _aot(*gpu, "--programs", "encoder", "decode", "train", "--model", "b+",
                 "--batch", "1", "8", env=env)
    lines += _aot(*gpu, "--programs", "predictor", "--model", "b+", "--batch", "1", env=env)
    lines += _aot(*gpu, "--programs", "train", "--train-preset", "tiny", "--model", "t",
                  "--image-size", "128", "--dtype", "float32", "--batch", "4", env=env)
    assert len(lines) == 3 * 2 + 3 + 1
    for line in lines:
        assert line["compiled"], line
        assert line["fits"], line
        name = (line["program"], line.get("part"))
        if line is lines[-1]:  # float32: cuDNN takes no float32, attention=auto takes XLA's path
            assert line["cudnn_attention_calls"] == 0, line
        elif name != ("predictor", "preprocess"):
            assert line["cudnn_attention_calls"] > 0, line
        if line["program"] != "train":
            assert line["while_loops"] == 0, line


def test_instruction_costs_ranks_the_entry_computation():
    """`aot.instruction_costs` on a hand-written optimised TPU module: only the entry
    computation's instructions count (a fused computation's are priced in its fusion), ranked by
    `estimated_cycles`, each with its share of the entry's cycles, opcode, shape and source."""
    from p2s_jax.aot import instruction_costs

    cfg = '"flag_configs":[],"estimated_cycles":"{}"'
    hlo = "\n".join([
        "HloModule jit_step, entry_computation_layout={(bf16[8,128]{1,0})->bf16[8,128]{1,0}}",
        "%fused (p: bf16[8,128]) -> bf16[8,128] {",
        "  %p = bf16[8,128]{1,0} parameter(0)",
        "  ROOT %inner = bf16[8,128]{1,0} multiply(%p, %p), backend_config={" + cfg.format(900)
        + "}",
        "}",
        "",
        "ENTRY %main (x: bf16[8,128]) -> bf16[8,128] {",
        "  %x = bf16[8,128]{1,0:T(8,128)(2,1)} parameter(0)",
        "  %fusion = bf16[8,128]{1,0:T(8,128)(2,1)} fusion(%x), kind=kLoop, calls=%fused, "
        'metadata={op_name="jit(step)/mul"}, backend_config={' + cfg.format(30) + "}",
        "  %convolution.3 = f32[8,128]{1,0:T(8,128)} convolution(%fusion, %x), "
        'metadata={op_name="jit(step)/dot_general"}, backend_config={' + cfg.format(60) + "}",
        "  ROOT %copy = (bf16[8,128]{1,0}, f32[8]{0}) copy-start(%fusion), backend_config={"
        + cfg.format(10) + "}",
        "}",
    ])
    rows = instruction_costs(hlo, 2)
    assert [(r["opcode"], r["cycles"], r["op_name"]) for r in rows] == [
        ("convolution", 60, "jit(step)/dot_general"), ("fusion", 30, "jit(step)/mul")]
    assert [r["share"] for r in rows] == [0.6, 0.3]
    assert rows[0]["shape"] == "f32[8,128]{1,0:T(8,128)}"
    assert [(r["opcode"], r["shape"]) for r in instruction_costs(hlo, 5)][2:] == [
        ("copy-start", "tuple")]
