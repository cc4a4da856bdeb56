"""FineXtract for ComfyUI: the entry point ComfyUI imports (V3 schema, comfy_entrypoint)."""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
