"""Test set-up shared by the plain tests (tests/core, tests/lab) and the host tests (tests/host).

The repository root is appended (not prepended) to sys.path, the one place it is, so that ``finextract_core`` (in the
plain process), ``lab``, ``tools`` and ``fixtures`` import, while the pack's own ``nodes`` folder can never shadow
ComfyUI's top-level ``nodes`` module, which the host puts first. scripts/test.sh runs the plain tests and the host tests
in two processes, so that each holds one copy of the pack: the top-level core here, the one ComfyUI loads there.
"""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

