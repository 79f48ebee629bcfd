"""Training-sample throughput of the loader: threads against worker processes (grain), and how
much of a sample's work holds Python's GIL.

Records: generated COCO-format persons on 640 x 480 JPEG photos (`p2s_jax.data.synthetic`),
prepared as tfds ArrayRecord records (what `p2s train` reads); samples at 1024 with the official
augmentations, one person per sample (the paper's recipe). For each loader (threads or
processes, 1 and 2 workers) the host's stream of samples is read for `--steps` batches after a
warm-up batch: samples/s (wall), CPU-ms per sample (this process and its workers, from
`os.times`, which counts the worker processes once they are joined; the start-up of a run of
the warm-up batch alone taken off) and the training process's own CPU while it receives the batches
after the warm-up one (`time.process_time`: all its threads; with worker processes the batches
come whole, `data.batch_ring`), which bounds what one host can feed.

GIL share: one thread makes samples in a loop while a pure-Python counter thread counts; the
counter's rate beside it, against its rate alone, is the share of the time the sample thread
leaves the GIL to others (on a machine with a core for each of the two). 1 - that share is the
part of sample-making that serialises on the GIL: threads cannot scale past 1 / it.

    python scripts/benchmark_loader.py                  # 16 records, 12 batches of 4
    python scripts/benchmark_loader.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path


def make_records(root: Path, num_images: int):
    """Generated 640 x 480 JPEG persons, prepared as tfds records -> the source."""
    from p2s_jax.data.builder import load_source, prepare
    from p2s_jax.data.pipeline import synthetic_config
    from p2s_jax.data.synthetic import make_coco_dataset, make_keypoint_detections

    annotations, _ = make_coco_dataset(root / "raw", num_images, (1, 3), seed=0,
                                       image_size=(480, 640), image_format="JPEG")
    make_keypoint_detections(annotations, 0, 2.0, root / "raw" / "detections.json")
    prepare(root / "raw", root / "tfds", synthetic_config("bench"))
    return load_source(root / "tfds", "bench")


def loader_for(source, workers: str, num_workers: int, batch: int):
    from p2s_jax.data.augment import AugmentConfig
    from p2s_jax.data.loader import TrainLoader

    return TrainLoader(source, global_batch_size=batch, image_size=1024, objects_per_image=1,
                       seed=0, augment_config=AugmentConfig(), num_workers=num_workers,
                       prefetch=2, workers=workers)


def _run(source, workers: str, num_workers: int, batch: int, steps: int
         ) -> tuple[float, float, float]:
    """(wall seconds of `steps` batches after a warm-up batch, CPU seconds of the whole run:
    this process and its joined workers, start-up included, and of this process alone while
    it received those `steps` batches)."""
    before = os.times()
    loader = loader_for(source, workers, num_workers, batch)
    batches = loader.iterate(0, steps + 1)
    next(batches)  # warm-up: worker start-up, first decodes
    start, main = time.perf_counter(), time.process_time()
    for _ in batches:
        pass
    seconds, main = time.perf_counter() - start, time.process_time() - main
    loader.close()
    after = os.times()
    cpu = sum(getattr(after, k) - getattr(before, k)
              for k in ("user", "system", "children_user", "children_system"))
    return seconds, cpu, main


def measure(source, workers: str, num_workers: int, batch: int, steps: int) -> dict:
    """samples/s and CPU-ms per sample of one loader (the CPU of a run of the warm-up batch
    alone, start-up, taken off), and the training process's own CPU-ms per sample while it
    receives the batches after the warm-up one."""
    seconds, cpu, main = _run(source, workers, num_workers, batch, steps)
    _, start_up, _ = _run(source, workers, num_workers, batch, 0)
    samples = steps * batch
    return {"loader": workers, "workers": num_workers, "samples": samples,
            "samples_per_s": samples / seconds,
            "cpu_ms_per_sample": 1000 * (cpu - start_up) / samples,
            "main_process_cpu_ms_per_sample": 1000 * main / samples}


def gil_share(source, seconds: float = 4.0) -> dict:
    """The share of a sample thread's time that the GIL is free for a counting thread."""
    def count(stop: threading.Event, out: list):
        n = 0
        while not stop.is_set():
            n += 1
        out.append(n)

    def rate(with_samples: bool) -> float:
        stop, out = threading.Event(), []
        counter = threading.Thread(target=count, args=(stop, out))
        loader = loader_for(source, "threads", 0, 1)
        if with_samples:
            def make():
                step = 0
                while not stop.is_set():
                    loader.batch(step)
                    step += 1
            maker = threading.Thread(target=make)
            maker.start()
        counter.start()
        time.sleep(seconds)
        stop.set()
        counter.join()
        if with_samples:
            maker.join()
        return out[0] / seconds

    loader_for(source, "threads", 0, 1).batch(0)  # warm-up
    alone, beside = rate(False), rate(True)
    return {"counter_alone_per_s": alone, "counter_beside_per_s": beside,
            "gil_held_share": max(0.0, 1.0 - beside / alone)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        source = make_records(Path(tmp), args.num_images)
        rows = [measure(source, workers, n, args.batch, args.steps)
                for workers in ("threads", "processes") for n in (1, 2)]
        gil = gil_share(source)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "python": sys.version.split()[0], "rows": rows, "gil": gil}
    print("| loader | workers | samples/s | CPU-ms / sample | of which the training process |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['loader']} | {row['workers']} | {row['samples_per_s']:.1f} | "
              f"{row['cpu_ms_per_sample']:.0f} | {row['main_process_cpu_ms_per_sample']:.2f} |")
    print(f"GIL held {100 * gil['gil_held_share']:.0f} % of a sample thread's time "
          f"(counter {gil['counter_beside_per_s']:.3g}/s beside it, "
          f"{gil['counter_alone_per_s']:.3g}/s alone)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
