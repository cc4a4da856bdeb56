"""FineXtract for ComfyUI: the entry point ComfyUI imports (V3 schema, comfy_entrypoint)."""

from .nodes import comfy_entrypoint

# Front-end extension files, served by ComfyUI under /extensions/<pack folder>/.
WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
