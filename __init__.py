"""FineXtract for ComfyUI: the entry point ComfyUI imports (V3 schema, comfy_entrypoint)."""

from .nodes import comfy_entrypoint

# The front-end extension (web/js), served by ComfyUI under /extensions/<pack folder>/.
WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
