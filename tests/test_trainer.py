"""The trainer: overfitting, exact resume after SIGKILL, 1 vs 4 devices, NaN stop, export, configs.

Training runs in subprocesses (tests/support/train_runner.py, the `p2s` CLI) sharing a persistent
compilation cache, so that each distinct program compiles once per session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from support import multihost
from support import reference
from p2s_jax.train.metrics_writer import read_jsonl
from p2s_jax.train.config import (TrainConfig, apply_overrides, from_dict, load_config,
                                  parse_overrides, tiny, to_dict)

HERE = Path(__file__).parent
RUNNER = HERE / "support" / "train_runner.py"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    environment = dict(os.environ)
    environment["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    # every program, however small (Flax compiles each parameter's initialiser): a process
    # after the first builds the tiny model in 4 s instead of 17 s
    environment["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    environment["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    environment.pop("XLA_FLAGS", None)
    environment["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE)])
    return environment


def _run(args, env, timeout=600, check=True):
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def _p2s(*args):
    return [sys.executable, "-m", "p2s_jax.cli", *args]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env):
    """`p2s train --config tiny` from start to end: the reference run."""
    workdir = tmp_path_factory.mktemp("run_a")
    proc = _run(_p2s("train", "--config", "tiny", "--workdir", str(workdir), "--no-progress"),
                env)
    # --no-progress silences tfds' bars while it prepares the generated records, and tfds'
    # warning about a config of one's own is not shown
    assert "prepared synthetic_8_0" in proc.stdout, proc.stdout
    for noise in ("examples/s", "Using custom data configuration"):
        assert noise not in proc.stdout + proc.stderr, (noise, proc.stderr[-2000:])
    # no progress bar: a line per log_every (1) steps, as a pod's log file shows it
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")
             and "/12: loss " in line]
    assert [int(line.split("/")[0].split()[1]) for line in lines] == list(range(1, 13)), lines
    assert all(" images/s, data-bound " in line and line.endswith(" %") for line in lines)
    assert "training data: 8 records, 8 generated images" in proc.stdout
    return workdir


def test_overfit_drives_loss_down_and_iou_up(tmp_path, env):
    _run([sys.executable, str(RUNNER), "overfit", str(tmp_path)], env)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 41))
    loss = np.array([r["core_loss"] for r in records])
    last_iou = np.array([r["iou_after_point_3"] for r in records])
    assert np.isfinite(loss).all()
    assert loss[-5:].mean() < 0.05 * loss[:3].mean(), loss
    assert last_iou[:3].mean() < 0.3 and last_iou[-5:].mean() > 0.7, last_iou
    # every loss term and the per-point IoU are logged, and TensorBoard got the same scalars
    assert {"loss_mask", "loss_dice", "loss_iou", "loss_class", "lr", "images_per_second",
            "iou_after_point_1", "grad_norm"} <= set(records[0])
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tags = {v.tag for e in EventFileLoader(str(events[0])).Load() for v in e.summary.value}
    assert {"core_loss", "iou_after_point_3"} <= tags


def test_non_finite_loss_stops_with_step_batch_and_checkpoint(tmp_path, env):
    proc = _run([sys.executable, str(RUNNER), "nan", str(tmp_path)], env, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    message = proc.stderr
    assert "non-finite loss or gradient at step 3" in message
    assert "batch record ids [12, 13, 14, 15]" in message
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / '2'}" in message
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [2]  # nothing after the bad step was saved
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["core_loss"]) for r in records)


def torch_load(path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _export(workdir, out, env, *flags):
    """`p2s export` in this process: no warning on the way, the file with the user's umask."""
    import warnings

    from p2s_jax.cli import main

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["export", "--workdir", str(workdir), "--out", str(out), *flags]) == 0
    assert not [w for w in caught if "not writable" in str(w.message)], caught
    umask = os.umask(0)
    os.umask(umask)
    assert Path(out).stat().st_mode & 0o777 == 0o666 & ~umask
    return torch_load(out)


def _same_data(workdir: Path, uninterrupted: Path) -> None:
    """A new workdir that trains and evaluates on the uninterrupted run's generated data."""
    workdir.mkdir()
    for name in ("synthetic", "synthetic_eval"):
        os.symlink(uninterrupted / name, workdir / name)


def _assert_same_params(workdir: Path, uninterrupted: Path, tmp_path: Path, env) -> None:
    ours = _export(workdir, tmp_path / f"{workdir.name}.pt", env, "--image-only")
    ref = _export(uninterrupted, tmp_path / "reference.pt", env, "--image-only", "--overwrite")
    assert ours.keys() == ref.keys()
    for key in ref:
        assert np.array_equal(ours[key].numpy(), ref[key].numpy()), key


def _wait_for(path: Path, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"ended before {what}: {proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"no {what} in time"
        time.sleep(0.1)


def test_sigterm_then_sigkill_in_a_save_then_resume_is_bit_identical(tmp_path, env,
                                                                    uninterrupted):
    """A preemption notice (SIGTERM) in the middle of the run: the step in flight finishes,
    the step reached is saved and committed, one line says where and how to go on, exit
    status 75. The resumed run is then killed (SIGKILL) while its last save is written but not
    committed (a hook holds the commit): the next resume starts from the last complete
    checkpoint, and the run ends with the parameters of the uninterrupted one."""
    workdir = tmp_path / "run_b"
    _same_data(workdir, uninterrupted)
    marker = tmp_path / "marker"
    hooks = {"P2S_TEST_SLOW_LOADER": "0.3", "P2S_TEST_SLOW_FROM": "4",
             "P2S_TEST_MARK_STEP": "7", "P2S_TEST_MARK_FILE": str(marker)}
    proc = subprocess.Popen(_p2s("train", "--config", "tiny", "--workdir", str(workdir),
                                 "--no-progress", "--import", "support.train_hooks"),
                            env={**env, **hooks}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(marker, proc, "step 7")
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 75, log[-3000:]
    lines = [line for line in log.splitlines() if line.startswith("p2s train:")]
    assert len(lines) == 1 and "Traceback" not in log, log[-3000:]
    line = lines[0]
    assert "stopped by SIGTERM (preemption or maintenance notice) at step" in line
    step = int(line.split(" at step ")[1].split(":")[0])
    assert 7 <= step < 12
    assert f"checkpoint {workdir / 'checkpoints' / str(step)} saved" in line
    assert line.endswith(f"continue with: p2s train --workdir {workdir} --resume")
    assert (workdir / "checkpoints" / str(step) / "commit_success.txt").is_file()

    marker.unlink()
    proc = subprocess.Popen(_p2s("train", "--workdir", str(workdir), "--resume", "--no-progress",
                                 "--import", "support.train_hooks"),
                            env={**env, "P2S_TEST_HOLD_COMMIT_STEP": "12",
                                 "P2S_TEST_MARK_FILE": str(marker)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(marker, proc, "the held save of step 12")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert str(step) in saved and "12" not in saved and any(n.startswith("12.") for n in saved)
    resumed = _run(_p2s("train", "--workdir", str(workdir), "--resume", "--no-progress"), env)
    assert f"trained {12 - step} step" in resumed.stdout  # from the last complete checkpoint
    _assert_same_params(workdir, uninterrupted, tmp_path, env)


def test_unrestorable_checkpoint_then_resume_step_with_processes_and_a_profile(
        tmp_path, env, uninterrupted):
    """A damaged latest checkpoint: one line names it and the step before it; `--resume-step`
    continues from that one (the later checkpoint moved aside, not deleted), here with the
    samples made in worker processes, a profile of two steps and workers made slow (each record
    read waits a second in the worker processes): the same parameters as the uninterrupted
    run, a trace TensorBoard reads, the time split of every step and a line that says the run
    waits on its data."""
    workdir = tmp_path / "run_d"
    shutil.copytree(uninterrupted, workdir, symlinks=True)
    for blob in (workdir / "checkpoints" / "12" / "state").rglob("ocdbt.process_0/d/*"):
        blob.write_bytes(blob.read_bytes()[:100])
    proc = _run(_p2s("train", "--workdir", str(workdir), "--resume", "--no-progress"), env,
                check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr[-3000:]
    assert err[0].startswith(f"p2s train: error: checkpoint {workdir / 'checkpoints' / '12'} "
                             "cannot be restored")
    assert err[0].endswith("the checkpoint before it is step 8: continue from it with --resume "
                           "--resume-step 8")
    resumed = _run(_p2s("train", "--workdir", str(workdir), "--resume", "--resume-step", "8",
                        "--no-progress", "--import", "support.train_hooks", "data.loader=processes",
                        "profile_steps=[9,10]"), {**env, "P2S_TEST_SLOW_RECORDS": "1.0"})
    assert "trained 4 steps" in resumed.stdout
    assert "data-bound: " in resumed.stdout and "waiting on the loader" in resumed.stdout
    # steps 9-12 of the first run are abandoned: logged once each, the old ones set aside
    steps = [r["step"] for r in read_jsonl(workdir / "metrics.jsonl") if "core_loss" in r]
    assert steps == list(range(1, 13))
    abandoned = read_jsonl(workdir / "metrics.abandoned.jsonl")
    assert sorted({r["step"] for r in abandoned if "core_loss" in r}) == [9, 10, 11, 12]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "tensorboard"))  # TensorBoard's own reader
    events.Reload()
    assert [e.step for e in events.Scalars("core_loss")] == list(range(1, 13))
    assert (workdir / "checkpoints.unused" / "12").is_dir()
    assert json.loads((workdir / "config.json").read_text())["data"]["loader"] == "processes"
    traces = list((workdir / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 10_000
    records = [r for r in read_jsonl(workdir / "metrics.jsonl") if "core_loss" in r]
    # the resumed steps wait on the slow workers (the first of them for every batch's 4 s)
    assert sum(record["time_loader_s"] for record in records[-4:]) >= 1.0
    for record in records[-4:]:
        assert record["time_transfer_s"] >= 0
        # the step's wall time is the device's work plus its wait for the host
        assert record["time_device_s"] + record["time_device_idle_s"] == pytest.approx(
            record["time_step_s"])
        assert record["images_per_second"] == pytest.approx(4 / record["time_step_s"])
    _assert_same_params(workdir, uninterrupted, tmp_path, env)


def test_evaluation_while_training_equals_p2s_evaluate_and_curve(tmp_path, env, uninterrupted,
                                                                 capsys):
    """The tiny run evaluates its held-out split at steps 6 and 12: the metrics and masks it
    logs at step 12 are those `p2s evaluate` gives on the checkpoint of step 12 (same data,
    same preset), and its correction curve is `p2s curve`'s; `p2s export --best` writes the
    checkpoint of the best AP."""
    records = read_jsonl(uninterrupted / "metrics.jsonl")
    evaluations = {r["step"]: r for r in records if "eval/AP" in r}
    assert sorted(evaluations) == [6, 12]
    logged = evaluations[12]
    raw = uninterrupted / "synthetic_eval" / "raw"
    exported = tmp_path / "step12.pt"
    _export(uninterrupted, exported, env, "--image-only", "--step", "12")
    out = tmp_path / "results.json"
    _run(_p2s("evaluate", "--annotations", str(raw / "annotations.json"), "--images",
              str(raw / "images"), "--keypoints", str(raw / "detections.json"), "--checkpoint",
              str(exported), "--image-size", "128", "--preset", "sam-pose2seg", "--out",
              str(out), "--no-progress"), env)
    summary = json.loads((tmp_path / "results.summary.json").read_text())
    for name in ("AP", "AP50", "AP75", "APm", "APl"):
        assert logged[f"eval/{name}"] == summary["metrics"][name], name
    assert json.loads(out.read_text()) == json.loads(
        (uninterrupted / "eval" / "step_12.json").read_text())
    assert json.loads(out.read_text())  # masks to compare
    curve = _run(_p2s("curve", "--annotations", str(raw / "annotations.json"), "--images",
                      str(raw / "images"), "--checkpoint", str(exported), "--image-size", "128",
                      "--points", "3", "--out", str(tmp_path / "curve.png"), "--no-progress"),
                 env).stdout
    values = [float(v) for v in curve.split("mean IoU after each point: ")[1].split()[:3]]
    assert values == pytest.approx([logged[f"eval/iou_after_point_{t}"] for t in (1, 2, 3)],
                                   abs=1e-4)
    assert any(v > 0 for v in values)
    (best,) = [int(p.name) for p in (uninterrupted / "best").iterdir() if p.name.isdigit()]
    assert evaluations[best]["eval/AP"] == max(r["eval/AP"] for r in evaluations.values())
    # `p2s compare`: the workdir's row is its best held-out step, beside the summary
    from p2s_jax.cli import main

    capsys.readouterr()
    assert main(["compare", str(tmp_path / "results.summary.json"), str(uninterrupted), "--out",
                 str(tmp_path / "compare.md")]) == 0
    printed = capsys.readouterr().out
    assert f"| {uninterrupted.name} | workdir (step {best}) | " in printed
    assert (tmp_path / "compare.png").stat().st_size > 1000
    from_best = _export(uninterrupted, tmp_path / "best.pt", env, "--image-only", "--best")
    said = capsys.readouterr().out
    assert f"(step {best}; held-out AP {100 * evaluations[best]['eval/AP']:.1f}; " in said, said
    from_step = (torch_load(exported) if best == 12 else  # on ties Orbax keeps the later
                 _export(uninterrupted, tmp_path / "at_best.pt", env, "--image-only", "--step",
                         str(best)))
    assert all(np.array_equal(from_best[k].numpy(), from_step[k].numpy()) for k in from_step)


def test_finished_run_and_missing_step_say_so(tmp_path, env, uninterrupted):
    proc = _run(_p2s("train", "--workdir", str(uninterrupted), "--resume", "--no-progress"), env)
    assert f"the run in {uninterrupted} is complete: step 12 of 12; nothing to train" \
        in proc.stdout
    proc = _run(_p2s("export", "--workdir", str(uninterrupted), "--out", str(tmp_path / "x.pt"),
                     "--step", "5", "--image-only"), env, check=False)
    assert proc.returncode == 2 and not (tmp_path / "x.pt").exists()
    assert proc.stderr.strip().endswith("holds no checkpoint of step 5; saved steps: [4, 8, 12]")


def _strict_load(path):
    """The official strict loader (`sam2.build_sam._load_checkpoint`, which BBoxMaskPose's
    `prepare_model` uses through `build_sam2`) into the full official t model."""
    from sam2.build_sam import _load_checkpoint

    official = reference.official_model("sam2.1_hiera_t", 128)
    saved = {k: v.clone() for k, v in official.state_dict().items()}
    try:
        _load_checkpoint(official, str(path))
        return {k: v.clone() for k, v in official.state_dict().items()}
    finally:
        official.load_state_dict(saved)  # the cached reference model is shared


def test_export_loads_with_the_official_strict_loader(tmp_path, env, uninterrupted, capsys):
    import torch

    from p2s_jax.cli import main
    from p2s_jax.train.state import build_training_model
    from weights_conversion import VIDEO_MEMORY_PREFIXES, convert_checkpoint, to_state_dict

    original = tmp_path / "sam2.1_t.pt"  # the "original" checkpoint: official t, random weights
    full = reference.official_state_dict(reference.official_model("sam2.1_hiera_t", 128))
    torch.save({"model": {k: torch.from_numpy(v) for k, v in full.items()}}, original)
    video = {k for k in full if k.startswith(VIDEO_MEMORY_PREFIXES)}
    assert len(video) > 100

    # A run from random weights knows no video tensors: a clear error, or --image-only / --base.
    capsys.readouterr()
    assert main(["export", "--workdir", str(uninterrupted), "--out",
                 str(tmp_path / "x.pt")]) == 2
    assert "pass --base ORIGINAL.pt" in capsys.readouterr().err
    random_base = tmp_path / "random_t.pt"  # what p2s init writes: no video-memory tensors
    torch.save({"model": {k: torch.from_numpy(v) for k, v in full.items()
                          if not k.startswith(VIDEO_MEMORY_PREFIXES)}}, random_base)
    assert main(["export", "--workdir", str(uninterrupted), "--out", str(tmp_path / "x.pt"),
                 "--best", "--base", str(random_base)]) == 2
    err = capsys.readouterr().err
    assert f"--base {random_base} holds no video-memory tensors" in err and "pass --base" \
        not in err and not (tmp_path / "x.pt").exists()
    _export(uninterrupted, tmp_path / "image_only.pt", env, "--image-only")
    with pytest.raises(RuntimeError, match="Missing key"):
        _strict_load(tmp_path / "image_only.pt")
    state = _export(uninterrupted, tmp_path / "based.pt", env, "--base", str(original))
    loaded = _strict_load(tmp_path / "based.pt")
    for key in video:
        np.testing.assert_array_equal(loaded[key].numpy(), full[key])
    config = from_dict(json.loads((uninterrupted / "config.json").read_text()))
    initial = to_state_dict(build_training_model(config))
    key = "sam_mask_decoder.iou_prediction_head.layers.0.weight"  # fine-tuned
    assert not np.array_equal(state[key].numpy(), initial[key])
    np.testing.assert_array_equal(loaded[key].numpy(), state[key].numpy())
    key = "image_encoder.trunk.blocks.0.attn.qkv.weight"  # frozen
    assert np.array_equal(state[key].numpy(), initial[key])

    # Runs initialised from the .pt or from the folder `p2s convert` wrote carry them by
    # themselves (the same checkpoints, only the config's init_checkpoint differs).
    folder, _ = convert_checkpoint(original, tmp_path / "converted", image_size=128)
    for init in (original, folder):
        workdir = tmp_path / f"from_{Path(init).name}"
        shutil.copytree(uninterrupted, workdir)
        saved = json.loads((workdir / "config.json").read_text())
        saved["init_checkpoint"] = str(init)
        (workdir / "config.json").write_text(json.dumps(saved))
        _export(workdir, tmp_path / f"{workdir.name}.pt", env)
        loaded = _strict_load(tmp_path / f"{workdir.name}.pt")
        for key in video:
            np.testing.assert_array_equal(loaded[key].numpy(), full[key])


@pytest.fixture(scope="module")
def device_runs(tmp_path_factory, env):
    """`train_runner.py devices` (2 toy steps of `tiny`) on a given layout, cached per layout:
    (processes, devices per process) -> (flat params npz of process 0, metrics records)."""
    cache = {}

    def run(processes: int, devices: int):
        if (processes, devices) not in cache:
            root = tmp_path_factory.mktemp(f"devices_{processes}x{devices}")
            environment = {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
            extra = multihost.process_env(processes) if processes > 1 else [{}]
            workdir = root / "wd"
            procs = [subprocess.Popen([sys.executable, str(RUNNER), "devices", str(workdir),
                                       str(root / f"params_{i}.npz")],
                                      env={**environment, **e}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
                     for i, e in enumerate(extra)]
            for proc in procs:
                out, _ = proc.communicate(timeout=600)
                assert proc.returncode == 0, out[-3000:]
            params = [dict(np.load(root / f"params_{i}.npz")) for i in range(processes)]
            for other in params[1:]:  # every process ends with the same parameters
                assert all(np.array_equal(other[k], params[0][k]) for k in params[0])
            cache[processes, devices] = params[0], read_jsonl(workdir / "metrics.jsonl")
        return cache[processes, devices]

    return run


def _assert_same_training(a, b):
    """Two runs of the same 2 steps on different device layouts agree."""
    (params_a, records_a), (params_b, records_b) = a, b
    assert params_a.keys() == params_b.keys() and len(params_a) > 200
    diff2 = update2 = 0.0
    moved = 0
    for key in params_a:
        if key.startswith("initial"):
            continue
        one, other, initial = params_a[key], params_b[key], params_a["initial" + key]
        update, diff = np.linalg.norm(one - initial), np.linalg.norm(other - one)
        moved += update > 0
        diff2, update2 = diff2 + diff ** 2, update2 + update ** 2
        # equal up to the summation order of the gradient all-reduce, which Adam's per-element
        # normalisation magnifies where gradients are tiny; the key-projection biases have an
        # exactly-zero gradient (softmax shift invariance): Adam steps on rounding noise there
        if not key.endswith("['k_proj']['bias'].value"):
            assert diff <= 2e-2 * update, (key, diff / update)
    assert np.sqrt(diff2 / update2) < 2e-3
    assert moved > 100  # the two steps did move the parameters
    # the loss and the (pre-clip) gradient norm agree step by step: a missing or wrong
    # all-reduce (sum instead of mean) changes them, even where Adam hides it in the update
    assert [r["step"] for r in records_a] == [r["step"] for r in records_b] == [1, 2]
    for ra, rb in zip(records_a, records_b):
        for name in ("core_loss", "loss_mask", "loss_dice", "loss_iou", "loss_class",
                     "grad_norm", "iou_after_point_3"):
            assert rb[name] == pytest.approx(ra[name], rel=1e-4, abs=1e-6), name


EPS32 = float(np.finfo(np.float32).eps)


def test_first_step_gradients_on_one_and_four_devices_and_in_bf16(tmp_path, env):
    """The gradients the optimiser receives (`make_gradient_step`: every trained tensor, the
    key-projection biases included) on 1 device and on 4, for the tiny model's first batch
    with two points (the first prompt and one correction step: the sampler and the mask input).

    Float32 budget: the two layouts compute the same sums in another order (4 images' terms
    summed inside one program, or one per device and then all-reduced) and XLA fuses a
    one-image program differently from a four-image one. Rounding noise in a module's
    gradients scales with the largest gradient flowing through that module, so each element
    may differ by 2^-14 of its module's largest gradient (256 float32 eps; the key-projection
    biases, whose exact gradient is 0 by the softmax's shift invariance, are pure noise of that
    order). Measured worst: 58 eps. The loss is the same to 1e-6.

    bf16 compute (float32 weights, the paper's setting) follows float32: the loss within 2 %,
    the gradient within a cosine of 0.99 (bf16 keeps 8 bits: 2^-8 relative per operation)."""
    out = dict(np.load(_run_runner(tmp_path, env, "gradients")))
    assert out["loss_1"] == pytest.approx(out["loss_4"], rel=1e-6)
    keys = [k[1:] for k in out if k.startswith("1[")]
    module = {}
    for key in keys:
        name = key.rsplit("['", 1)[0]
        module[name] = max(module.get(name, 0.0), float(np.abs(out["1" + key]).max()))
    assert len(keys) > 100 and sum(m > 0 for m in module.values()) > 40
    for key in keys:
        diff = np.abs(out["1" + key] - out["4" + key]).max()
        assert diff <= 2.0 ** -14 * module[key.rsplit("['", 1)[0]], (key, diff)
    assert any(key.endswith("['k_proj']['bias'].value") for key in keys)  # none left out
    assert out["loss_b"] == pytest.approx(out["loss_1"], rel=0.02)
    ref = np.concatenate([np.ravel(out["1" + k]) for k in keys]).astype(np.float64)
    bf16 = np.concatenate([np.ravel(out["b" + k]) for k in keys]).astype(np.float64)
    assert bf16 @ ref / (np.linalg.norm(bf16) * np.linalg.norm(ref)) >= 0.99


def _run_runner(tmp_path, env, mode: str, devices: int = 4) -> Path:
    out = tmp_path / f"{mode}.npz"
    _run([sys.executable, str(RUNNER), mode, str(tmp_path / "wd"), str(out)],
         {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
    return out


@pytest.mark.slow  # 86 s of two training processes; their first step's gradients stay in CI
def test_one_and_four_devices_give_the_same_update(device_runs):
    _assert_same_training(device_runs(1, 1), device_runs(1, 4))


@pytest.mark.slow  # 80 s of training processes
def test_two_processes_give_the_same_update(device_runs):
    """Multi-host: 2 processes x 2 devices (jax.distributed on this machine, gloo collectives),
    each feeding its half of the batch, train as 1 process on 1 device does."""
    _assert_same_training(device_runs(1, 1), device_runs(2, 2))


def test_missing_paths_stop_the_run_before_anything_is_written(tmp_path, capsys):
    from p2s_jax.cli import main

    workdir = tmp_path / "never"
    for override, named in (("init_checkpoint=/nowhere/sam2.1_t.pt", "init_checkpoint "
                                                                      "/nowhere/sam2.1_t.pt"),
                             ("data.synthetic_images=0", "set data.data_dir"),
                             ("eval.synthetic_images=0", "eval.annotations"),
                             ("global_batch_size=100000", "global_batch_size 100000 is larger "
                              "than the training data (data.synthetic_images=8)"),
                             ("data.annotations=a.json data.synthetic_images=4",
                              "data.annotations=a.json and data.synthetic_images=4 both name "
                              "training data")):
        assert main(["train", "--config", "tiny", "--workdir", str(workdir), *override.split(),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1, err
        assert not workdir.exists()
    workdir.write_text("a file")
    assert main(["train", "--config", "tiny", "--workdir", str(workdir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--workdir {workdir} is a file: name a folder" in err, err
    assert len(err.strip().splitlines()) == 1


def _two_processes(workdir: Path, env, *args, hooks=None) -> list[subprocess.Popen]:
    """`p2s train --distributed` as 2 processes x 2 CPU devices on this machine."""
    environment = {**env, **(hooks or {}),
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = []
    for e in multihost.process_env(2):
        command = _p2s("train", "--workdir", str(workdir), "--no-progress", "--import",
                       "support.train_hooks", "--distributed", "--coordinator",
                       e["P2S_TEST_COORDINATOR"], "--num-processes", "2", "--process-id",
                       e["P2S_TEST_PROCESS"], *args)
        procs.append(subprocess.Popen(command, env={**environment, **e}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.mark.slow  # three runs of 2 training processes: 4 minutes
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path, env):
    """2 processes x 2 devices: SIGTERM to process 1 only; JAX's preemption sync point makes
    both save the same step and stop (exit 75); resumed on both, the parameters equal those of
    an uninterrupted 2 x 2 run."""
    reference_dir, workdir = tmp_path / "whole", tmp_path / "stopped"
    for proc in _two_processes(reference_dir, env, "--config", "tiny"):
        out = proc.communicate(timeout=900)[0]
        assert proc.returncode == 0, out[-3000:]
    _same_data(workdir, reference_dir)
    marker = tmp_path / "marker"
    procs = _two_processes(workdir, env, "--config", "tiny",
                           hooks={"P2S_TEST_SLOW_LOADER": "0.3", "P2S_TEST_MARK_STEP": "7",
                                  "P2S_TEST_MARK_FILE": str(marker)})
    _wait_for(marker, procs[1], "step 7")
    procs[1].send_signal(signal.SIGTERM)
    logs = [proc.communicate(timeout=300)[0] for proc in procs]
    steps = []
    for proc, log in zip(procs, logs):
        assert proc.returncode == 75, log[-3000:]
        (line,) = [line for line in log.splitlines() if line.startswith("p2s train:")]
        steps.append(int(line.split(" at step ")[1].split(":")[0]))
        assert line.endswith(f"continue with: p2s train --workdir {workdir} --resume "
                             "--distributed"), line
    assert steps[0] == steps[1] and 7 <= steps[0] < 12
    assert (workdir / "checkpoints" / str(steps[0]) / "commit_success.txt").is_file()
    for proc in _two_processes(workdir, env, "--resume"):
        out = proc.communicate(timeout=900)[0]
        assert proc.returncode == 0, out[-3000:]
    _assert_same_params(workdir, reference_dir, tmp_path, env)


def test_two_processes_prepare_the_training_data_once(tmp_path, env):
    """Multi-host: process 0 generates and prepares the records while process 1 waits at the
    barrier; both then read the same records."""
    workdir = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, str(RUNNER), "prepare", str(workdir)],
                              env={**env, **e}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for e in multihost.process_env(2)]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    assert "process 0: 8 records" in logs[0] and "process 1: 8 records" in logs[1]
    assert sum(log.count("preparing p2s_person_segmentation/") for log in logs) == 1
    assert "preparing" in logs[0]


def test_workdir_guards(uninterrupted, env):
    proc = _run(_p2s("train", "--config", "tiny", "--workdir", str(uninterrupted),
                     "--no-progress"), env, check=False)
    assert proc.returncode == 2
    assert "already holds checkpoints: pass --resume" in proc.stderr
    proc = _run(_p2s("train", "--config", "tiny", "--workdir", str(uninterrupted), "--resume",
                     "optim.base_lr=1e-3", "--no-progress"), env, check=False)
    assert proc.returncode == 2
    assert "differs from" in proc.stderr and "optim.base_lr" in proc.stderr
    # a sampler registered by a user module: unknown without --import, accepted with it (the
    # run then stops at the workdir check, after the config was validated)
    sampler = ["correction.sampler=nan_on_marker", "--no-progress"]
    proc = _run(_p2s("train", "--config", "tiny", "--workdir", str(uninterrupted), *sampler),
                env, check=False)
    assert proc.returncode == 2 and "unknown sampler 'nan_on_marker'" in proc.stderr
    proc = _run(_p2s("train", "--config", "tiny", "--workdir", str(uninterrupted), "--import",
                     "support.train_runner", *sampler), env, check=False)
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr, proc.stderr
    proc = _run(_p2s("train", "--config", "tiny", "--workdir", str(uninterrupted), "--import",
                     "no_such_module_p2s", *sampler), env, check=False)
    assert proc.returncode == 2 and "--import no_such_module_p2s" in proc.stderr


def test_config_overrides_and_round_trip():
    config = load_config("paper", parse_overrides(
        ["optim.base_lr=1e-5", "correction.sampler=mask_refine", "data.augment=false",
         'correction.sampler_kwargs=[["prob_to_sample_from_gt", 0.2]]']))
    assert config.optim.base_lr == 1e-5 and config.correction.sampler == "mask_refine"
    assert config.data.augment is False
    assert config.correction.sampler_kwargs == (("prob_to_sample_from_gt", 0.2),)
    assert from_dict(json.loads(json.dumps(to_dict(config)))) == config
    paper = load_config("paper")
    assert (paper.model, paper.image_size, paper.global_batch_size) == ("sam2.1_hiera_b+", 1024, 8)
    assert (paper.correction.num_points, paper.correction.sampler) == (8, "pose_mask_refine")
    assert paper.freeze_image_encoder and paper.compute_dtype == "bfloat16"
    assert (paper.optim.base_lr, paper.optim.weight_decay, paper.optim.clip_norm) == (5e-6, 0.1, 0.1)
    with pytest.raises(ValueError, match="unknown config key 'optim.lr'"):
        apply_overrides(TrainConfig(), {"optim.lr": "1"})
    with pytest.raises(ValueError, match="config key 'total_steps': expected int"):
        apply_overrides(TrainConfig(), {"total_steps": "many"})
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        apply_overrides(TrainConfig(), {"correction.sampler": "nope"})
    with pytest.raises(ValueError, match="must look like key=value"):
        parse_overrides(["optim.base_lr"])
    assert tiny().model == "sam2.1_hiera_t"
