"""Custom ComfyUI types shared by the pack's nodes."""

from comfy_api.latest import io

# finextract_core.embeddings.Embeddings: unit descriptors that remember which model and preset produced them.
Embeddings = io.Custom("FINEXTRACT_EMBEDDINGS")
