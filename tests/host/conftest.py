"""A real ComfyUI host, imported in-process, with this pack loaded through ComfyUI's own custom-node loader."""

from __future__ import annotations

import os
import types

import pytest

from comfy_server import read_host_env


@pytest.fixture(scope="session")
def host() -> types.SimpleNamespace:
    """ComfyUI on the CPU with its built-in nodes and this pack registered; the pack's modules as attributes."""
    if not os.path.exists(os.path.join(read_host_env().get("FINEXTRACT_COMFYUI", ""), "main.py")):
        pytest.fail("No ComfyUI host: run scripts/bootstrap_host.sh (or set FINEXTRACT_COMFYUI to a ComfyUI checkout)",
                    pytrace=False)
    from comfy_inprocess import load_host

    return load_host()
