"""A real ComfyUI host, imported in-process, with this pack loaded through ComfyUI's own custom-node loader.

The host is loaded when this file is imported, before pytest collects a test module, so that every module of the
process (tests, fixtures, the lab) reaches the pack's one copy: ``host.module(name)`` or ``lab.product.pack_module``.
"""

from __future__ import annotations

import os
import types

import pytest

from tools.host.comfy_server import read_host_env

if not os.path.exists(os.path.join(read_host_env().get("FINEXTRACT_COMFYUI", ""), "main.py")):
    pytest.exit("No ComfyUI host: run tools/host/bootstrap_host.sh (or set FINEXTRACT_COMFYUI to a ComfyUI checkout)",
                returncode=4)

from tools.host.comfy_inprocess import load_host  # noqa: E402

HOST = load_host()


@pytest.fixture(scope="session")
def host() -> types.SimpleNamespace:
    """ComfyUI on the CPU with its built-in nodes and this pack registered; ``host.module(name)`` gives its modules."""
    return HOST
