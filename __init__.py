"""FineXtract for ComfyUI: the entry point ComfyUI imports (V3 schema, comfy_entrypoint)."""

from __future__ import annotations

import logging
import re

from .nodes import comfy_entrypoint

# The front-end extension (web/js), served by ComfyUI under /extensions/<pack folder>/.
WEB_DIRECTORY = "./web"
# The oldest ComfyUI the whole test suite has passed on; docs/compatibility.md lists every version it passed on.
OLDEST_TESTED_COMFYUI = "0.3.75"


def host_version() -> str | None:
    """The version of the ComfyUI this pack is loaded into (the comfyui_version module at its root), if it says."""
    try:
        from comfyui_version import __version__
    except ImportError:
        return None
    return __version__


def release(version: str) -> tuple[int, ...]:
    """``"0.3.75"`` -> ``(0, 3, 75)``, so that 0.10 comes after 0.3 (a suffix such as ``rc1`` is ignored)."""
    return tuple(int(number) for number in re.findall(r"\d+", version)[:3])


def version_warning(version: str | None) -> str | None:
    """What to tell the user at start-up about the ComfyUI ``version``, or None for one the pack is tested on."""
    if version is None:
        return (f"FineXtract: this ComfyUI does not say which version it is (no comfyui_version module); the pack is "
                f"tested on ComfyUI {OLDEST_TESTED_COMFYUI} and newer")
    if release(version) < release(OLDEST_TESTED_COMFYUI):
        return (f"FineXtract: ComfyUI {version} is older than {OLDEST_TESTED_COMFYUI}, the oldest version this pack is "
                f"tested on; its nodes may fail or give other results here: update ComfyUI")
    return None


if (_warning := version_warning(host_version())) is not None:
    logging.getLogger("finextract").warning(_warning)

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
