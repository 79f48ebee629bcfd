"""Training speed: p2s_jax's compiled training step vs the official `SAM2Train`, same random
weights, same generated batches, same settings, same machine, one run.

One step, both sides: the batch goes to the device, the frozen image encoder runs forward, the
interactive correction loop runs 1 + (points - 1) decoder steps on every object (the official
`SAM2Train.forward` on one frame: `forward_image`, `_prepare_backbone_features`, the first point
from `get_next_point(gt, None, "uniform")`, `track_step` with `frames_to_add_correction_pt=[0]`),
then the official loss (`MultiStepMultiMasksAndIous`, the SAM 2.1 fine-tune weights), backward,
global-norm clipping at 0.1 and an AdamW update.

- ours: `p2s_jax.train.step.make_train_step` (data parallel over a mesh of `--devices` devices,
  default 1, as the official side runs on one), compiled ahead of the timed steps (the compile
  time is printed separately);
- official: `SAM2Train` in train mode, `image_encoder.*` frozen, `torch.optim.AdamW` with the
  official decay / no-decay groups, `clip_grad_norm_(0.1)`; the loss is read with `.item()`
  every step as the official trainer does; on a GPU under `torch.autocast(bfloat16)` (forward and
  loss, as the official trainer), on a CPU in float32.

Both sides see the same images and the same objects: the official model decodes all objects of
the batch as one batch dimension, the image features repeated per object; ours vmaps the loop over
images and batches the objects of each image.  The prompt points are random on both sides (the
official sampler on the official side, `--sampler`, default the same MaskRefine draw, on ours).

Each side runs in its own subprocess (the official one first; it also writes the random weights
that ours loads), so their memory peaks are separate: on a CPU the peak RSS of the process
(`ru_maxrss`, which includes model building and, for ours, XLA compilation) and the RSS peak sampled
during the timed steps; on a GPU `peak_bytes_in_use` of the JAX device and
`torch.cuda.max_memory_allocated()`.

Reports images/s of both (median step time over `--steps` timed steps after `--warmup` steps) and
the ratio ours / official (> 1: we are faster).

On a CPU shared with other work the numbers are noisy, and unevenly so: torch's OpenMP threads
slow down by up to ~10x when another process holds a core, XLA's thread pool much less.  Compare
runs on an otherwise idle machine; `--torch-threads` sets the official side's thread count.

    python scripts/benchmark_train.py                                   # CPU: t at 256, 1 x 2
    python scripts/benchmark_train.py --image-size 256 512 --json out.json
    python scripts/benchmark_train.py --model b+ --image-size 1024 --images 8 --objects 1  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from p2s_jax.utils import allocator
TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_DISTINCT_BATCHES = 4  # the timed steps cycle over this many generated batches
DATA_SEED = 0

# defaults per device (any of them can be given on the command line)
DEFAULTS = {
    "cpu": dict(model="t", image_size=[256], images=1, objects=2, dtype="float32", warmup=2,
                steps=5),
    "gpu": dict(model="b+", image_size=[1024], images=8, objects=1, dtype="bfloat16", warmup=5,
                steps=20),
}


# ------------------------------------------------------------------------------ data

def make_batches(count: int, images: int, objects: int, size: int, seed: int = DATA_SEED):
    """`count` batches of ellipse "people" on noise (`p2s_jax.data.synthetic.ellipse_batch`).
    Deterministic in the seed: both subprocesses build the same."""
    from p2s_jax.data.synthetic import ellipse_batch

    rng = np.random.default_rng(seed)
    return [ellipse_batch(rng, images, size, objects) for _ in range(count)]


# ------------------------------------------------------------------------------ memory

def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """Peak RSS of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class RssSampler:
    """Samples the RSS every `interval` seconds in a thread, keeps the maximum."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def time_steps(step, batches: list, spec: dict):
    """Warm-up steps, then timed ones: (first loss, last loss, step times, RssSampler)."""
    first_loss = loss = None
    for i in range(spec["warmup"]):
        loss = step(batches[i % len(batches)])
        first_loss = loss if first_loss is None else first_loss
    times = []
    with RssSampler() as sampler:
        for i in range(spec["steps"]):
            batch = batches[(spec["warmup"] + i) % len(batches)]
            t0 = time.perf_counter()
            loss = step(batch)
            times.append(time.perf_counter() - t0)
            first_loss = loss if first_loss is None else first_loss
    return first_loss, loss, times, sampler


def _timing(times: list[float], images: int) -> dict:
    median = statistics.median(times)
    return {"step_seconds": times, "median_step_s": median, "min_step_s": min(times),
            "images_per_s": images / median}


# ------------------------------------------------------------------------------ official side

def _decay_groups(model, torch):
    """The official weight-decay rule: none for `*bias*` and LayerNorm parameters."""
    layer_norm = set()
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            for name, _ in module.named_parameters(recurse=False):
                layer_norm.add(f"{module_name}.{name}" if module_name else name)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if "bias" in name or name in layer_norm else decay).append(p)
    return decay, no_decay


def run_official(spec: dict) -> dict:
    sys.path.insert(0, TESTS)
    from support import reference  # official model builder, torchvision stubs (before the torch import)

    torch = reference.import_torch()
    from sam2.modeling.sam2_utils import get_next_point
    from training.loss_fns import MultiStepMultiMasksAndIous

    from weights_conversion.convert import VIDEO_MEMORY_PREFIXES

    size, bf16 = spec["image_size"], spec["dtype"] == "bfloat16"
    device = "cuda" if spec["device"] == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the official side needs torch with CUDA on a GPU machine")
    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])
    start = time.perf_counter()
    model = reference.official_model(spec["model_name"], size, apply_postprocessing=False,
                                      train=True)
    # the same random weights for ours (image path only; views, no copy)
    np.savez(spec["weights"], **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()
                                 if not k.startswith(VIDEO_MEMORY_PREFIXES)})
    if spec.get("weights_only"):
        return {}
    torch.set_grad_enabled(True)  # reference.import_torch() turns autograd off
    model.num_correction_pt_per_frame = spec["points"] - 1
    model.to(device)
    model.train()
    for name, p in model.named_parameters():  # freeze_image_encoder=True
        p.requires_grad_(not name.startswith("image_encoder."))
    decay, no_decay = _decay_groups(model, torch)
    params = decay + no_decay
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=5e-6, betas=(0.9, 0.999), eps=1e-8)
    loss_fn = MultiStepMultiMasksAndIous(
        weight_dict={"loss_mask": 20, "loss_dice": 1, "loss_iou": 1, "loss_class": 1},
        supervise_all_iou=True, iou_use_l1_loss=True, pred_obj_scores=True,
        focal_gamma_obj_score=0.0, focal_alpha_obj_score=-1.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    batches = make_batches(NUM_DISTINCT_BATCHES, spec["images"], spec["objects"], size)
    setup_s = time.perf_counter() - start
    rss_setup = rss_bytes()
    correct = [0] if spec["points"] > 1 else []  # (no correction points: the loop is skipped)

    def step(batch) -> float:
        image = torch.from_numpy(batch["image"]).to(device)
        gt = torch.from_numpy(batch["masks"]).to(device)  # (B, P, S, S) bool
        b, p = gt.shape[:2]
        gt_masks = gt.reshape(b * p, 1, size, size)
        img_ids = torch.arange(b, device=device).repeat_interleave(p)  # flat_obj_to_img_idx
        x = (image.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            backbone_out = model.forward_image(x)
            _, feats, pos, sizes = model._prepare_backbone_features(backbone_out)
            feats = [f[:, img_ids] for f in feats]
            pos = [f[:, img_ids] for f in pos]
            points, labels = get_next_point(gt_masks=gt_masks, pred_masks=None, method="uniform")
            out = model.track_step(
                frame_idx=0, is_init_cond_frame=True, current_vision_feats=feats,
                current_vision_pos_embeds=pos, feat_sizes=sizes,
                point_inputs={"point_coords": points, "point_labels": labels},
                mask_inputs=None,
                output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
                num_frames=1, run_mem_encoder=False, frames_to_add_correction_pt=correct,
                gt_masks=gt_masks)
            out = {k: v for k, v in out.items() if k != "obj_ptr"}
            loss = loss_fn([out], gt_masks[:, 0][None])["core_loss"]
        value = loss.item()  # the official trainer's finiteness check (a sync)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm=0.1)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return value

    first_loss, loss, times, sampler = time_steps(step, batches, spec)
    trained = [p for p in params if p.grad is not None]
    result = {"side": "official", "setup_s": setup_s, "first_loss": first_loss, "last_loss": loss,
              "rss_after_setup_bytes": rss_setup, "peak_rss_bytes": peak_rss_bytes(),
              "timed_rss_peak_bytes": sampler.peak,
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "torch_device": (torch.cuda.get_device_name() if device == "cuda" else "cpu"),
              # parameters that received a gradient (the video-memory modules of SAM2Train get none)
              "trained_tensors": len(trained),
              "trained_params": int(sum(p.numel() for p in trained)),
              **_timing(times, spec["images"])}
    if device == "cuda":
        result["peak_device_bytes"] = int(torch.cuda.max_memory_allocated())
        result["peak_device_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    return result


# ------------------------------------------------------------------------------ our side

def run_ours(spec: dict) -> dict:
    import flax
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from p2s_jax.hardware import xla_cost
    from p2s_jax.parallel import DATA_AXIS
    from p2s_jax.train import step as trainer
    from p2s_jax.model.configs import compute_dtype, get_config
    from p2s_jax.train.correction import CorrectionConfig
    from p2s_jax.train.state import STEP_INPUTS, new_state
    from p2s_jax.model.sam2 import abstract_model
    from p2s_jax.train.config import TrainConfig
    from weights_conversion.convert import from_state_dict

    size = spec["image_size"]
    devices = jax.devices()[:spec["devices"]]
    if spec["images"] % len(devices):
        raise SystemExit(f"--images {spec['images']} is not a multiple of the {len(devices)} "
                         f"devices")
    start = time.perf_counter()
    config = TrainConfig(
        model=spec["model_name"], image_size=size, compute_dtype=spec["dtype"],
        freeze_image_encoder=True, global_batch_size=spec["images"], total_steps=1000,
        correction=CorrectionConfig(num_points=spec["points"], sampler=spec["sampler"]))
    mesh = Mesh(np.array(devices), (DATA_AXIS,))
    model = abstract_model(get_config(config.model, size), compute_dtype(config.compute_dtype))
    with np.load(spec["weights"]) as state_dict:
        from_state_dict(model, state_dict, source=spec["weights"])
    graphdef, tx, state, frozen = new_state(config, model)
    replicated = NamedSharding(mesh, P())
    state, frozen = jax.device_put((state, frozen), replicated)
    trained_leaves = jax.tree.leaves(state["params"])
    trained = (len(trained_leaves), int(sum(x.size for x in trained_leaves)))
    del model, trained_leaves
    data_sharding = NamedSharding(mesh, P(DATA_AXIS))
    batches = make_batches(NUM_DISTINCT_BATCHES, spec["images"], spec["objects"], size)

    def put(batch):
        return {k: jax.make_array_from_process_local_data(data_sharding, batch[k])
                for k in STEP_INPUTS}

    step_fn = trainer.make_train_step(graphdef, tx, config, mesh)
    jax.block_until_ready((state, frozen))
    setup_s = time.perf_counter() - start
    rss_setup = rss_bytes()

    start = time.perf_counter()
    compiled = step_fn.lower(state, frozen, put(batches[0])).compile()
    compile_s = time.perf_counter() - start
    rss_compiled, peak_compile = rss_bytes(), peak_rss_bytes()
    flops = None
    try:
        flops = xla_cost(compiled).get("flops")
        flops = None if flops is None else float(flops)
    except Exception:  # cost analysis is optional, backend-dependent
        pass

    def step(batch):
        nonlocal state
        state, metrics = compiled(state, frozen, put(batch))
        jax.block_until_ready((state, metrics))
        if not bool(metrics["finite"]):
            raise FloatingPointError("non-finite loss or gradient in our step")
        return float(metrics["core_loss"])

    first_loss, loss, times, sampler = time_steps(step, batches, spec)
    result = {"side": "ours", "setup_s": setup_s, "compile_s": compile_s, "first_loss": first_loss,
              "last_loss": loss, "rss_after_setup_bytes": rss_setup,
              "rss_after_compile_bytes": rss_compiled,
              "peak_rss_through_compile_bytes": peak_compile,
              "peak_rss_bytes": peak_rss_bytes(), "timed_rss_peak_bytes": sampler.peak,
              "jax": jax.__version__,
              "flax": flax.__version__, "jax_backend": jax.default_backend(),
              "jax_devices": f"{len(devices)} x {devices[0].device_kind}",
              "xla_flops_per_step": flops, "trained_tensors": trained[0],
              "trained_params": trained[1], **_timing(times, spec["images"])}
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        result["peak_device_bytes"] = int(stats["peak_bytes_in_use"])
    return result


# ------------------------------------------------------------------------------ driver

def _worker(spec_json: str, result_path: str) -> None:
    spec = json.loads(spec_json)
    allocator.set_mode(spec["malloc"])
    result = run_official(spec) if spec["side"] == "official" else run_ours(spec)
    Path(result_path).write_text(json.dumps(result))


def _spawn(spec: dict, result_path: Path) -> dict:
    """Runs one side in a fresh interpreter (separate memory peaks); returns its result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec),
           "--_result", str(result_path)]
    if subprocess.run(cmd).returncode:
        raise SystemExit(f"the {spec['side']} side failed (its traceback is above)")
    return json.loads(result_path.read_text())


def _probe_backend() -> str:
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()
    return "gpu" if out and out[-1] in ("gpu", "cuda", "rocm") else "cpu"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def parse_args() -> tuple[argparse.Namespace, str | None]:
    """The command line, with the device's defaults filled in; -> (args, device)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                        help="picks the defaults and the official side's torch device (auto: "
                             "gpu when JAX's default backend is one)")
    parser.add_argument("--model", help="t, s, b+ or l (random weights); default t on CPU, b+ "
                                        "on GPU")
    parser.add_argument("--image-size", type=int, nargs="+",
                        help="one run per size; default 256 on CPU (try 256 512), 1024 on GPU")
    parser.add_argument("--images", type=int, help="images per step (default 1 CPU, 8 GPU)")
    parser.add_argument("--objects", type=int, help="objects per image (default 2 CPU, 1 GPU)")
    parser.add_argument("--points", type=int, default=8, help="1 initial + correction points")
    parser.add_argument("--sampler", default="mask_refine",
                        help="our point sampler (default: MaskRefine, the official side's draw; "
                             "pose_mask_refine is the paper's)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="default float32 on CPU, bfloat16 on GPU (official: autocast)")
    parser.add_argument("--devices", type=int, default=1,
                        help="JAX devices of our mesh (the official side uses one)")
    parser.add_argument("--warmup", type=int, help="untimed steps after compilation (default 2 "
                                                   "CPU, 5 GPU)")
    parser.add_argument("--steps", type=int, help="timed steps (default 5 CPU, 20 GPU)")
    parser.add_argument("--torch-threads", type=int,
                        help="torch.set_num_threads on the official side (default: torch's own)")
    parser.add_argument("--skip-official", action="store_true",
                        help="time ours only (the official model is still built, for its weights)")
    parser.add_argument("--malloc", default="kept", choices=allocator.MODES,
                        help="glibc malloc of both sides (p2s_jax.utils.allocator; `p2s` uses kept)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        return args, None
    device = _probe_backend() if args.device == "auto" else args.device
    for key, value in DEFAULTS[device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.points < 1:
        parser.error("--points must be >= 1")
    return args, device


def run_sizes(args, device: str, model_name: str) -> list[dict]:
    """Both sides at every image size, each in a fresh process."""
    runs = []
    for size in args.image_size:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            spec = {"model_name": model_name, "image_size": size, "images": args.images,
                    "objects": args.objects, "points": args.points, "sampler": args.sampler,
                    "dtype": args.dtype, "device": device, "devices": args.devices,
                    "warmup": args.warmup, "steps": args.steps,
                    "torch_threads": args.torch_threads, "malloc": args.malloc,
                    "weights": str(tmp / "weights.npz")}
            print(f"# {size} px: official side ...", flush=True)
            official = _spawn({**spec, "side": "official",
                               "weights_only": args.skip_official}, tmp / "official.json")
            print(f"# {size} px: our side ...", flush=True)
            ours = _spawn({**spec, "side": "ours"}, tmp / "ours.json")
        ratio = (ours["images_per_s"] / official["images_per_s"]) if official else None
        runs.append({"image_size": size, "ours": ours, "official": official or None,
                     "ratio_ours_over_official": ratio})
    return runs


def print_report(runs: list[dict], device: str) -> dict:
    """The markdown table and the summary lines; -> the versions of both sides."""
    first = runs[0]
    versions = {"jax": first["ours"]["jax"], "flax": first["ours"]["flax"],
                "jax_devices": first["ours"]["jax_devices"],
                "torch": (first["official"] or {}).get("torch"),
                "torch_device": (first["official"] or {}).get("torch_device"),
                "torch_threads": (first["official"] or {}).get("torch_threads")}
    print(f"\n# jax {versions['jax']} (flax {versions['flax']}) on {versions['jax_devices']}; "
          f"torch {versions['torch']} on {versions['torch_device']} "
          f"({versions['torch_threads']} threads)")
    if device == "gpu":
        mem = "peak device MiB (torch: reserved)"
    else:
        mem = "peak RSS MiB (after setup / in timed steps)"
    print(f"\n| size | side | images/s | median step (s) | min step (s) | compile (s) | {mem} "
          f"| loss (first step) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in runs:
        for side in ("ours", "official"):
            r = run[side]
            if not r:
                continue
            if device == "gpu":
                memory = _mib(r.get("peak_device_bytes"))
                if "peak_device_reserved_bytes" in r:
                    memory += f" ({_mib(r['peak_device_reserved_bytes'])})"
            else:
                memory = (f"{_mib(r['peak_rss_bytes'])} ({_mib(r['rss_after_setup_bytes'])} / "
                          f"{_mib(r['timed_rss_peak_bytes'])})")
            compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
            print(f"| {run['image_size']} | {side} | {r['images_per_s']:.3f} | "
                  f"{r['median_step_s']:.3f} | {r['min_step_s']:.3f} | {compile_s} | {memory} | "
                  f"{r['first_loss']:.4f} |")
    print()
    for run in runs:
        ours = run["ours"]
        flops = ours.get("xla_flops_per_step")
        print(f"{run['image_size']} px, ours: compile {ours['compile_s']:.1f} s (not in images/s), "
              f"XLA cost analysis {flops / 1e9:.1f} GFLOP per step" if flops else
              f"{run['image_size']} px, ours: compile {ours['compile_s']:.1f} s (not in images/s)")
    for run in runs:
        if run["ratio_ours_over_official"] is not None:
            print(f"{run['image_size']} px: ours / official images/s = "
                  f"{run['ratio_ours_over_official']:.2f}x")
    return versions


def main() -> None:
    args, device = parse_args()
    if args._worker:
        _worker(args._worker, args._result)
        return
    from p2s_jax.model.configs import get_config

    if args.warmup == 0:
        print("# warning: --warmup 0 times the official side's first step, with torch's one-time "
              "kernel set-up in it (ours is compiled beforehand)", flush=True)
    model_name = get_config(args.model).name
    host = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"# host {host}; device {device}; {model_name}; {args.images} image(s) x "
          f"{args.objects} object(s) per step, {args.points} points, sampler {args.sampler}; "
          f"{args.dtype}; warmup {args.warmup}, timed steps {args.steps}", flush=True)
    runs = run_sizes(args, device, model_name)
    versions = print_report(runs, device)
    if args.json:
        out = {"settings": {"device": device, "model": model_name, "image_sizes": args.image_size,
                            "images_per_step": args.images, "objects_per_image": args.objects,
                            "points": args.points, "sampler": args.sampler, "dtype": args.dtype,
                            "jax_devices_used": args.devices, "torch_threads": args.torch_threads,
                            "malloc": args.malloc, "warmup": args.warmup,
                            "steps": args.steps, "host": host},
               "versions": versions, "runs": runs}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
