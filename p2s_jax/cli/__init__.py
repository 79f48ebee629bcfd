"""`p2s`, the command line: `arguments` (the argument tables), `commands` (one function per
command), `main` (parse and dispatch). Run as `p2s ...` or `python -m p2s_jax.cli ...`."""

from p2s_jax.cli.arguments import PROG, build_parser, inference_config
from p2s_jax.cli.commands import COMMANDS
from p2s_jax.cli.main import main

__all__ = ["COMMANDS", "PROG", "build_parser", "inference_config", "main"]
