"""The core stands alone: every module of finextract_core imports in a fresh interpreter without ComfyUI."""
import os
import pkgutil
import subprocess
import sys

import finextract_core

HOST_MODULES = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution")


def test_every_core_module_imports_without_comfyui():
    names = sorted(info.name for info in pkgutil.walk_packages(finextract_core.__path__, prefix="finextract_core."))
    assert "finextract_core.guidance" in names and "finextract_core.bank" in names
    script = ("import importlib, sys\n"
              f"for name in {names!r}: importlib.import_module(name)\n"
              f"print(sorted(m for m in {HOST_MODULES!r} if m in sys.modules))")
    root = os.path.dirname(finextract_core.__path__[0])
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"the core imported ComfyUI modules: {done.stdout}"
