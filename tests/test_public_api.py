"""Every public name of `p2s_jax` resolves, and every module of the package imports on its own
(in a fresh interpreter, so that no other test's imports hide a missing one)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import p2s_jax
import weights_conversion

REPO = Path(__file__).resolve().parents[1]


def _modules() -> list[str]:
    names = []
    for package in (p2s_jax, weights_conversion):
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
                  if not m.name.endswith(".__main__")]  # `python -m`: runs the command
    return sorted(names)


def test_every_public_name_resolves_to_its_defining_module():
    assert p2s_jax.__all__, "no public names"
    for name in p2s_jax.__all__:
        value = getattr(p2s_jax, name)
        module = p2s_jax._PUBLIC[name]
        assert getattr(value, "__module__", module) == module, (name, value.__module__)


def test_every_module_imports_in_a_fresh_interpreter():
    modules = _modules()
    assert "p2s_jax.data.poses" in modules and "p2s_jax.cli.main" in modules
    script = ("import importlib\n"
              f"modules = {modules!r}\n"
              "for name in modules:\n"
              "    importlib.import_module(name)\n"
              "print('imported', len(modules))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"imported {len(modules)}" in proc.stdout
