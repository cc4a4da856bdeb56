"""Test set-up shared by the pure-core tests (tests/core) and the host tests (tests/host).

The repository root is appended (not prepended) to sys.path so that ``finextract_core`` (and the helpers in scripts/) import, while the pack's
own ``nodes`` folder can never shadow ComfyUI's top-level ``nodes`` module, which the host puts first.
"""
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO_ROOT, os.path.join(REPO_ROOT, "scripts")):
    if path not in sys.path:
        sys.path.append(path)


@pytest.fixture
def one_torch_thread():
    """Tiny models run faster on one thread than on several that spin against each other on a shared CPU."""
    from finextract_core.world.training import torch_threads

    with torch_threads(1):
        yield
