"""`p2s`: parses the command line and dispatches to a command (`commands`).

An expected failure (`p2s_jax.utils.errors.Error`: a missing or malformed file, a checkpoint
that does not fit, a bad argument, an output that may not be written) ends the command with one
line naming the cause and exit status 2. Ctrl-C and SIGTERM end it with one line saying what
was kept, exit status 128 + the signal's number (130, 143); `p2s train` answers SIGTERM with a
checkpoint instead (docs/tpu-pod.md: exit status 75). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import signal
import sys


from p2s_jax.model.configs import ConfigError
from p2s_jax.parallel import describe_devices
from p2s_jax.runtime import set_up
from p2s_jax.utils.errors import (Error, Stopped, interrupt_signal, one_line,
                                  raise_on_signals)
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
    distributed = ((args.coordinator, args.num_processes, args.process_id)
                   if getattr(args, "distributed", False) else None)
    for note in set_up(args.command, args.malloc, args.command in (*COMPUTES, "init"),
                       distributed):
        print(f"{PROG}: {note}", file=sys.stderr)
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
            print(f"{PROG} {args.command}: interrupted ({signal.Signals(number).name}); "
                  "nothing was written", file=sys.stderr)
            return 128 + number


if __name__ == "__main__":
    sys.exit(main())
