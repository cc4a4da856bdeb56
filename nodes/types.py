"""Custom ComfyUI types shared by the pack's nodes (named as ComfyUI names its own: EMBEDDINGS like MODEL)."""

from comfy_api.latest import io

# Carries finextract_core.embeddings.Embeddings: unit descriptors that remember which model and preset produced them.
EMBEDDINGS = io.Custom("FINEXTRACT_EMBEDDINGS")
# Carries nodes.bank.BankRows: a candidate bank on disk and the candidate index of each row of its EMBEDDINGS.
CANDIDATE_BANK = io.Custom("FINEXTRACT_CANDIDATE_BANK")
