"""`p2s`: parses the command line and dispatches to a command (`commands`).

An expected failure (`p2s_jax.utils.errors.Error`: a missing or malformed file, a checkpoint
that does not fit, a bad argument, an output that may not be written) ends the command with one
line naming the cause and exit status 2. Ctrl-C and SIGTERM end it with one line saying what
was kept, exit status 128 + the signal's number (130, 143); `p2s train` answers SIGTERM with a
checkpoint instead (docs/tpu-pod.md: exit status 75). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import signal
import sys

import jax
import tensorflow_datasets as tfds

from p2s_jax.model.configs import ConfigError
from p2s_jax.parallel import describe_devices
from p2s_jax.utils import allocator
from p2s_jax.utils.download import cache_dir
from p2s_jax.utils.errors import Error, Stopped, interrupt_signal, raise_on_signals
from p2s_jax.train.config import import_modules
from p2s_jax.cli.arguments import PROG, build_parser, preparse_imports
from p2s_jax.cli.commands import COMMANDS, COMPUTES


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `p2s` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        import_modules(preparse_imports(argv))
    except Error as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if allocator.set_mode(allocator.choose_mode(args.malloc, args.command)):
        print(f"{PROG}: host memory: freed blocks are kept for reuse (--malloc default to turn "
              "off)", file=sys.stderr)
    if getattr(args, "no_progress", False):  # tfds draws its own bars when it prepares records
        tfds.display_progress_bar(False)
    if args.command in COMPUTES or args.command == "init":
        use_compilation_cache()
    if getattr(args, "distributed", False):  # before anything asks JAX for its devices
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if args.command in COMPUTES:
        print(f"{PROG}: {describe_devices()}")
    # a multi-process `p2s train` leaves SIGTERM to JAX's preemption notifier (the hosts agree
    # on the step to save at, p2s_jax.train.preemption)
    with raise_on_signals(sigterm=not (args.command == "train" and args.distributed)):
        try:
            return COMMANDS[args.command](args)
        except (Error, ConfigError) as err:
            stopped = isinstance(err, Stopped)
            print(f"{PROG} {args.command}: {'' if stopped else 'error: '}{one_line(err)}",
                  file=sys.stderr)
            return err.exit_status if stopped else 2
        except BaseException as err:
            number = interrupt_signal(err)
            if number is None:
                raise
            left = getattr(err, "p2s_left", "nothing was written")
            print(f"{PROG} {args.command}: interrupted ({signal.Signals(number).name}); {left}",
                  file=sys.stderr)
            return 128 + number


def use_compilation_cache(environ=os.environ) -> None:
    """Compiled programs are kept on disk and reused by later runs (a second `p2s segment`
    skips the encoder's compilation, a resumed pod run its train step's): JAX's persistent
    compilation cache in `<p2s cache>/xla`, every program kept (the model's initialisers
    compile in a tenth of a second each, and there are a hundred). `JAX_COMPILATION_CACHE_DIR`
    chooses another folder; `P2S_COMPILATION_CACHE=off` turns it off."""
    if environ.get("P2S_COMPILATION_CACHE", "").lower() == "off":
        return
    if not environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(cache_dir(environ) / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def one_line(err: Exception, max_details: int = 3) -> str:
    """The error on one line (a long list of details is cut), except download instructions."""
    message = str(err).strip() or type(err).__name__
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if getattr(err, "keep_lines", False) or len(lines) <= 1:
        return message
    details = "; ".join(lines[1:1 + max_details])
    more = len(lines) - 1 - max_details
    return f"{lines[0]} {details}" + (f"; and {more} more" if more > 0 else "")


if __name__ == "__main__":
    sys.exit(main())
