"""The FineXtract pack this lab works with, as the one copy of it this process holds.

Where ComfyUI has loaded the pack (a server with the lab linked in, or a process that loaded the host in-process with
``tools.host.comfy_inprocess``), its modules are the ones ComfyUI's custom-node loader made from the repository's
``__init__.py``: the lab finds that module by its file, not by the name ComfyUI gave it. Anywhere else (the lab's own
tests, the demo runner before it starts a server) the pack's core is this checkout's top-level ``finextract_core``.
A process that needs the host must load it before it first asks for a pack module, so both never coexist
(``comfy_inprocess.load_host`` refuses to load a second copy).
"""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def loaded_pack() -> ModuleType | None:
    """The pack's root module if a ComfyUI loader has imported it into this process, else None."""
    entry_point = os.path.join(REPO_ROOT, "__init__.py")
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and os.path.realpath(path) == entry_point:
            return module
    return None


def pack_module(name: str) -> ModuleType:
    """The pack's module ``name`` (``"finextract_core.embeddings"``, ``"nodes.types"``) as this process holds it."""
    pack = loaded_pack()
    if pack is None:
        if not name.startswith("finextract_core"):
            raise RuntimeError(f"the pack's {name} needs ComfyUI: link the pack into ComfyUI's custom_nodes (the lab's "
                               "nodes are loaded after it), or load the host first (tools.host.comfy_inprocess)")
        return importlib.import_module(name)
    return importlib.import_module(f"{pack.__name__}.{name}")
