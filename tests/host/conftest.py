"""A real ComfyUI host, imported in-process, with this pack loaded through ComfyUI's own custom-node loader.

The host comes from scripts/bootstrap_host.sh (.host/host.env), or from FINEXTRACT_COMFYUI / FINEXTRACT_BASE.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import types

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_FOLDER = "finextract"


def host_settings() -> dict[str, str]:
    settings = {}
    env_file = os.path.join(REPO_ROOT, ".host", "host.env")
    if os.path.exists(env_file):
        with open(env_file) as f:
            settings.update(line.strip().split("=", 1) for line in f if "=" in line)
    for key in ("FINEXTRACT_COMFYUI", "FINEXTRACT_PYTHON", "FINEXTRACT_BASE"):
        if os.environ.get(key):
            settings[key] = os.environ[key]
    if not os.path.exists(os.path.join(settings.get("FINEXTRACT_COMFYUI", ""), "main.py")):
        pytest.fail("No ComfyUI host: run scripts/bootstrap_host.sh (or set FINEXTRACT_COMFYUI to a ComfyUI checkout)",
                    pytrace=False)
    return settings


@pytest.fixture(scope="session")
def host() -> types.SimpleNamespace:
    """ComfyUI imported on the CPU with its built-in nodes and this pack registered; the pack's modules as attributes."""
    settings = host_settings()
    comfy_root, base = settings["FINEXTRACT_COMFYUI"], settings["FINEXTRACT_BASE"]
    # One thread is steadier and no slower on these 2-core machines (see the notes on the host).
    import torch
    torch.set_num_threads(1)
    if comfy_root not in sys.path:
        sys.path.insert(0, comfy_root)
    from comfy.cli_args import args
    args.cpu = True
    args.base_directory = base
    args.disable_all_custom_nodes = False
    import folder_paths
    import utils.install_util  # noqa: F401 -- as main.py does, before nodes.py puts comfy/ (with utils.py) first
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    pack_path = os.path.join(folder_paths.get_folder_paths("custom_nodes")[0], PACK_FOLDER)
    assert asyncio.run(nodes.load_custom_node(pack_path)), f"ComfyUI could not load the pack from {pack_path}"
    pack_name = pack_path.replace(".", "_x_")
    return types.SimpleNamespace(
        nodes=nodes,
        folder_paths=folder_paths,
        base=base,
        pack_name=pack_name,
        guider=importlib.import_module(f"{pack_name}.nodes.guider"),
        guidance_nodes=importlib.import_module(f"{pack_name}.nodes.guidance"),
        core_guidance=importlib.import_module(f"{pack_name}.finextract_core.guidance"),
    )
