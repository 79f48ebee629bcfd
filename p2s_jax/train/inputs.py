"""What a training run reads, checked and made ready in one place before the model is built:
the initial checkpoint, the training records (prepared or generated once), this host's loader,
and the held-out set of evaluation while training (generated, read and checked once).

`check_inputs` only reads (every path the config names, and that generated data holds a
batch); `prepare_inputs` runs it, then writes what must be made (records, generated images)
and returns the loader and the held-out evaluator. The loop calls `prepare_inputs` once;
`p2s prepare train-data` calls `training_records`.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from etils import epath

from p2s_jax.data.pipeline import check_data_paths, training_loader, training_source
from p2s_jax.train.config import TrainConfig
from p2s_jax.train.evaluator import HeldOutEvaluator, held_out_files
from p2s_jax.utils.errors import InputError, MissingFileError


class RunInputs(NamedTuple):
    """A run's data, ready: its loader and the held-out evaluator (None: `eval.every` 0)."""

    loader: object  # `iterate(start_step)` -> (step, batch), `num_records`
    heldout: HeldOutEvaluator | None


def check_inputs(config: TrainConfig, workdir) -> None:
    """Every path the config reads, checked before the run writes anything: the initial
    checkpoint, the training data (prepared, or its raw files), the held-out set; and that
    generated data holds a global batch."""
    synthetic = config.data.synthetic_images
    if synthetic and config.global_batch_size > synthetic:
        raise InputError(f"global_batch_size {config.global_batch_size} is larger than the "
                         f"training data (data.synthetic_images={synthetic}): lower it to "
                         f"{synthetic} or less, or generate more images")
    if config.init_checkpoint and not epath.Path(config.init_checkpoint).exists():
        raise MissingFileError(f"init_checkpoint {config.init_checkpoint} not found (an "
                               "official .pt or a folder from p2s convert; \"\" for random "
                               "weights)")
    check_data_paths(config.data)
    if config.eval.every and not config.eval.synthetic_images:
        held_out_files(config, workdir)


def training_records(config: TrainConfig, workdir=None, progress: bool = True):
    """The records `config` trains on, prepared (or generated into the workdir) once."""
    return training_source(config.data, config.seed, workdir, progress)


def prepare_inputs(config: TrainConfig, workdir, loader=None, progress: bool = True
                   ) -> RunInputs:
    """`check_inputs`, then the records, this host's loader (or `loader`, given) and the
    held-out set. A global batch larger than the records is refused. progress: progress bars
    while records are written."""
    check_inputs(config, workdir)
    if loader is None:
        loader = training_loader(training_records(config, Path(workdir), progress), config.data,
                                 global_batch_size=config.global_batch_size,
                                 image_size=config.image_size, seed=config.seed)
    if config.global_batch_size > loader.num_records:
        getattr(loader, "close", lambda: None)()
        raise InputError(f"global_batch_size {config.global_batch_size} is larger than the "
                         f"training data ({loader.num_records} records): lower it to "
                         f"{loader.num_records} or less")
    heldout = HeldOutEvaluator(config, Path(workdir)) if config.eval.every else None
    return RunInputs(loader, heldout)
