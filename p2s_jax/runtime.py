"""How a `p2s` process is set up before its command runs: the host allocator, JAX's persistent
compilation cache, and several hosts joined into one JAX program."""

from __future__ import annotations

import os

import jax

from p2s_jax.utils import allocator
from p2s_jax.utils.download import cache_dir


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


def set_up(command: str, malloc: str = "auto", compiles: bool = True,
           distributed: tuple | None = None) -> list[str]:
    """Sets the process up for `command` -> lines to tell the user: the allocator mode of
    `--malloc` (`allocator.choose_mode`), the compilation cache when the command `compiles`,
    and `jax.distributed.initialize(*distributed)` (coordinator, processes, process id) when
    given, before anything asks JAX for its devices."""
    notes = []
    if allocator.set_mode(allocator.choose_mode(malloc, command)):
        notes.append("host memory: freed blocks are kept for reuse (--malloc default to turn "
                     "off)")
    if compiles:
        use_compilation_cache()
    if distributed is not None:
        jax.distributed.initialize(*distributed)
    return notes
