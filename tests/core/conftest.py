"""Fixtures of the core's tests, which run in a process without ComfyUI (scripts/test.sh)."""
import pytest

from finextract_core.threads import torch_threads


@pytest.fixture
def one_torch_thread():
    """Tiny models run faster on one thread than on several that spin against each other on a shared CPU."""
    with torch_threads(1):
        yield

