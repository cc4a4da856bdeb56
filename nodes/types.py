"""Custom ComfyUI types shared by the pack's nodes (named as ComfyUI names its own: EMBEDDINGS like MODEL). Each
carries one of the core's own objects from the node that makes it to the nodes that read it, so no node parses
another's text output; the JSON outputs beside them are for display."""

from comfy_api.latest import io

# Carries finextract_core.embeddings.Embeddings: unit descriptors that remember which model and preset produced them.
EMBEDDINGS = io.Custom("FINEXTRACT_EMBEDDINGS")
# Carries nodes.bank.BankRows: a candidate bank on disk and the candidate index of each row of its EMBEDDINGS.
CANDIDATE_BANK = io.Custom("FINEXTRACT_CANDIDATE_BANK")
# Carries finextract_core.run_settings.RunSettings: what determined the candidates (sampler or bank).
RUN_SETTINGS = io.Custom("FINEXTRACT_RUN_SETTINGS")
# Carries finextract_core.clusters.CandidateClusters: the clusters and the embeddings of the candidates clustered.
CLUSTERS = io.Custom("FINEXTRACT_CLUSTERS")
# Carries finextract_core.metrics.ExtractionScores: AS, A-ESR and each reference's best match.
EXTRACTION_SCORES = io.Custom("FINEXTRACT_EXTRACTION_SCORES")
# Carries an image embedder for the Candidate Bank in place of its SSCD file: an object with ``model_id``, ``preset``,
# ``identity`` (a string that changes when its weights do, for the bank's key) and ``embed(images) -> Embeddings``.
IMAGE_EMBEDDER = io.Custom("FINEXTRACT_IMAGE_EMBEDDER")
