"""Import the real ComfyUI host into this process (on the CPU) with its built-in nodes and this pack registered.

Used by the host tests, the benchmarks and the proving ground; the host comes from tools/host/bootstrap_host.sh or
FINEXTRACT_* variables. ComfyUI's own custom-node loader imports the pack, and everything in the process reaches the
pack's modules through ``module(name)``: one copy of the pack per process, found by its file rather than by the name
ComfyUI gives it.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import os
import sys
import types

from .comfy_server import PACK_FOLDER, missing_module_advice, read_host_env


@functools.cache
def load_host(threads: int = 1) -> types.SimpleNamespace:
    """Loads the host once per process; later calls return the same namespace."""
    if "finextract_core" in sys.modules:
        raise RuntimeError("finextract_core was imported as a top-level package before the host was loaded: load the "
                           "host first, so the process holds only the pack's own copy of its core")
    settings = read_host_env()
    comfy_root = settings.get("FINEXTRACT_COMFYUI", "")
    if not os.path.exists(os.path.join(comfy_root, "main.py")):
        raise RuntimeError("No ComfyUI host: run tools/host/bootstrap_host.sh (or set FINEXTRACT_COMFYUI)")
    if comfy_root not in sys.path:
        sys.path.insert(0, comfy_root)
    try:
        import torch
        # One thread is steadier and no slower on these 2-core machines (see the notes on the host).
        torch.set_num_threads(threads)
        from comfy.cli_args import args
        # FINEXTRACT_DEVICE=cuda lets ComfyUI pick the GPU and its dtypes (benchmarks/gpu_check.sh); cuda-fp32 keeps
        # fp32 weights and math (no TF32), for the exactness tests.
        device = os.environ.get("FINEXTRACT_DEVICE", "cpu")
        args.cpu = device == "cpu"
        if device == "cuda-fp32":
            args.force_fp32 = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        args.base_directory = settings["FINEXTRACT_BASE"]
        import folder_paths
        # As main.py does, before an older tree's nodes.py puts comfy/ (with its utils.py) first on sys.path.
        import utils.install_util  # noqa: F401
        import nodes
    except ModuleNotFoundError as error:
        raise RuntimeError(missing_module_advice(comfy_root, sys.executable, error.name or str(error))) from error

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    pack_path = os.path.join(folder_paths.get_folder_paths("custom_nodes")[0], PACK_FOLDER)
    if not asyncio.run(nodes.load_custom_node(pack_path)):
        raise RuntimeError(f"ComfyUI could not load the pack from {pack_path}; see the log above")
    entry_point = os.path.realpath(os.path.join(pack_path, "__init__.py"))
    pack = next(module for module in list(sys.modules.values())
                if os.path.realpath(getattr(module, "__file__", None) or "/") == entry_point)
    return types.SimpleNamespace(
        nodes=nodes,
        folder_paths=folder_paths,
        base=settings["FINEXTRACT_BASE"],
        pack=pack,
        comfyui_version=pack.host_version(),
        module=lambda name: importlib.import_module(f"{pack.__name__}.{name}"),
    )


def host_module(name: str) -> types.ModuleType:
    """The pack's module ``name`` (``"finextract_core.bank"``, ``"nodes.guider"``) in the host of this process."""
    return load_host().module(name)


if __name__ == "__main__":  # tools/host/bootstrap_host.sh checks a host this way: python -m tools.host.comfy_inprocess
    # Only errors: without a server, some of ComfyUI's own nodes warn that they cannot register with one.
    logging.basicConfig(level=logging.ERROR)
    try:
        loaded = load_host()
    except RuntimeError as error:
        sys.exit(f"[bootstrap] {error}")
    print(f"[bootstrap] ComfyUI {loaded.comfyui_version} loads the pack in {sys.executable}")
    if (warning := loaded.pack.version_warning(loaded.comfyui_version)) is not None:
        print(f"[bootstrap] {warning}")
