"""Writes the pack's example workflows (workflows/*.json, the graph editor's format) from the compact specs below.

Widget order, defaults, output slots and link types come from the /object_info of a real ComfyUI server started
here, so the files open as graphs exactly as ComfyUI would have saved them. Run after changing a spec or a node:

    .host/venv/bin/python -m tools.workflows.make_workflows [--out FOLDER]

The templates use the Candidate Bank (batched, resumable); the ``_one_batch`` variants sample all N candidates in
one batch. The paper's defaults and the SSCD file come from the pack's core, so they are written in one place.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from types import ModuleType

from ..host.comfy_server import REPO_ROOT, ComfyServer
from .workflow_api import is_widget, ordered_inputs, widget_value_count

WORKFLOWS_DIR = os.path.join(REPO_ROOT, "workflows")
BASE_FILE = "v1-5-pruned-emaonly.safetensors"
DREAMBOOTH_FILE = "my_dreambooth.safetensors"
LORA_FILE = "my_lora.safetensors"
# The Flux dev LoRA audit's files, as ComfyUI's own Flux template names them (UNETLoader, DualCLIPLoader, VAELoader).
FLUX_BASE_FILE = "flux1-dev.safetensors"
FLUX_CLIP_L_FILE = "clip_l.safetensors"
FLUX_T5_FILE = "t5xxl_fp16.safetensors"
FLUX_VAE_FILE = "ae.safetensors"
FLUX_LORA_FILE = "my_flux_lora.safetensors"
# The SDXL-derivative LoRA audit's: the derivative base the LoRA was trained on (Pony, Illustrious, NoobAI, ...).
SDXL_DERIVATIVE_BASE_FILE = "my_sdxl_derivative_base.safetensors"
SDXL_LORA_FILE = "my_sdxl_lora.safetensors"
N0 = 10  # the fine-tuning set's size; the paper samples N = 50 x N0 candidates
# Candidates per Candidate Bank batch: fits a 12 GB GPU for SD 1.x at 512 px (BANK_NOTE says why); the SDXL and Flux
# audits' batches at 1024 px, FAMILY_BANK_NOTES say why.
BANK_BATCH = 8
SDXL_BANK_BATCH = 4
FLUX_BANK_BATCH = 2
FLUX_SIZE = SDXL_SIZE = 1024
FLUX_STEPS = 28  # a usual Flux dev setting, with euler and the simple schedule (the paper gives no Flux steps)


def core(name: str) -> ModuleType:
    """A module of the pack's core, imported when the specs are built, in the generator's own process. (The tests and
    the lab import this module for its file names inside processes where ComfyUI has loaded the pack, whose core must
    then be the only copy; they never build the specs.)"""
    return importlib.import_module(f"finextract_core.{name}")


def guidance_settings(kind: str, mode: str) -> tuple[float, float]:
    """(w', k): the paper's defaults for a DreamBooth or LoRA fine-tune; the cfg baseline's own w'."""
    guidance = core("guidance")
    defaults = guidance.DREAMBOOTH_DEFAULTS if kind == "dreambooth" else guidance.LORA_DEFAULTS
    return (guidance.CFG_DEFAULT_SCALE if mode == "cfg" else defaults["scale"]), defaults["k"]


def sscd_note() -> str:
    sscd = core("sscd")
    return f"""SSCD FILE (needed by the Candidate Bank and every 'SSCD Embed' node)
Download {sscd.PAPER_MODEL_URL}
into ComfyUI/models/sscd/ (create the folder), then press 'r' in the graph to refresh the lists.
The file is read as weights only; no code in it is run."""


OUTPUTS_NOTE = """WHAT THE OUTPUTS MEAN
Clique Cluster groups the candidates into N0 groups of mutually similar images, the likeliest memorised first (a tight
group of near-copies, against the run's background), and Extracted Images gives one image per group: those are the
images the attack claims the model was fine-tuned on. The cluster size says how often the model produced that image,
the memorisation score how tight and separate its group is.
The Audit Report node writes report.html, summary.png, the extracted images and report.json (SHA-256 of the model
files, every sampler setting, embedder, clustering) into output/<folder_prefix>/, and shows a link to the report.
Re-running with the same inputs writes the same bytes. A similarity is not a proof of training-set membership."""

BANK_NOTE = f"""CANDIDATE BANK: N = 50 x N0 = {50 * N0} CANDIDATES, {BANK_BATCH} AT A TIME, RESUMABLE
The bank samples, decodes and embeds {BANK_BATCH} candidates at a time (batch_size) and keeps each finished batch in
output/<bank_folder>/ (latents and embeddings; the images are dropped). Cancel, or lose ComfyUI, and queue again: only
the missing candidates are made. Extracted Images decodes only the N0 extracted ones. Use one bank_folder per
setting: a folder that holds a bank of other settings (another seed, caption, w', model) is refused, naming what
differs.
Why {BANK_BATCH} fits a 12 GB GPU for SD 1.x at 512 x 512: the weights take about 4.3 GB (two fp16 UNets of 860 M
parameters for a DreamBooth pair, 3.4 GB; VAE, CLIP-L and SSCD disc_large 0.6 GB), and ComfyUI's own estimate of a
UNet pass (comfy/model_base.py, memory_required) is about 82 MiB per 512 px candidate in fp16, 0.7 GB for {BANK_BATCH};
ComfyUI splits the VAE decode to fit. That leaves room to spare (a LoRA needs one UNet). Not measured on a GPU by
this project. On a larger GPU raise batch_size (faster); on an out-of-memory error lower it: it never changes the
candidates."""

ONE_BATCH_NOTE = f"""ONE BATCH: ALL N = 50 x N0 = {50 * N0} CANDIDATES AT ONCE
The sampler, VAE Decode and SSCD Embed each take all N candidates in one batch: that needs a large GPU (the template
without '_one_batch' uses the Candidate Bank and fits 12 GB). If it does not fit, lower the Empty Latent's batch_size
(fewer candidates per image make the clusters less reliable), or use the Candidate Bank template."""


DREAMBOOTH_INTRO = f"""FINEXTRACT ON A DREAMBOOTH CHECKPOINT
Pretrained checkpoint: the model the fine-tune started from (for example {BASE_FILE}).
Fine-tuned checkpoint: the DreamBooth checkpoint under audit (models/checkpoints).
Training caption: the prompt it was fine-tuned with (for example 'sks style', 'a photo of sks dog').
In the Audit Report node pick the same two files from its lists: it records their SHA-256."""
LORA_INTRO = f"""FINEXTRACT ON A LORA
Base checkpoint: the model the LoRA was trained on (for example {BASE_FILE}); it is the 'pretrained' model.
LoRA under audit (models/loras): applied to the base, it is the 'fine-tuned' model. The sampler keeps the two
branches apart although ComfyUI shares the base weights.
Training caption: the LoRA's trigger prompt. Pick the base and LoRA files in the Audit Report node's lists."""



def family_bank_note(family: str) -> str:
    """The bank's note for the SDXL and Flux audits: ComfyUI's own estimate of a denoiser pass
    (comfy/model_base.py memory_required: latent positions x bytes per value x 0.01 MiB x the family's
    memory_usage_factor, 0.8 for SDXL and 3.1 for Flux) for the 2 rows (caption and empty) of each candidate."""
    if family == "sdxl":
        batch, size, weights = SDXL_BANK_BATCH, SDXL_SIZE, (
            "one fp16 UNet of 2.6 G parameters (the LoRA shares it), 5.1 GB; CLIP-L + bigG, VAE and SSCD about 2 GB")
        per_candidate, fits = 2 * 128 * 128 * 2 * 0.01 * 0.8, "12 GB"
    else:
        batch, size, weights = FLUX_BANK_BATCH, FLUX_SIZE, (
            "the 11.9 G-parameter transformer in fp8 (UNETLoader's weight_dtype fp8_e4m3fn), 11.9 GB; ComfyUI offloads "
            "T5-XXL after encoding the two prompts; VAE and SSCD well under 1 GB")
        per_candidate, fits = 2 * 128 * 128 * 2 * 0.01 * 3.1, "24 GB"
    return f"""CANDIDATE BANK: N = 50 x N0 = {50 * N0} CANDIDATES, {batch} AT A TIME, RESUMABLE
As in the SD 1.x templates: each finished batch is kept in output/<bank_folder>/, a cancelled run resumes, one
bank_folder per setting. Why {batch} fits a {fits} GPU at {size} x {size}: the weights take {weights}; ComfyUI's own
estimate of a denoiser pass (comfy/model_base.py, memory_required) is about {per_candidate:.0f} MiB per candidate
(caption and empty rows), {batch * per_candidate / 1024:.1f} GB for {batch}. Not measured on a GPU by this project. On
a larger GPU raise batch_size; on an out-of-memory error lower it: it never changes the candidates."""


def defaults_note(kind: str) -> str:
    scale, k = guidance_settings(kind, "finextract")
    return f"""PAPER DEFAULTS (FineXtract, ICML 2025)
{kind}: w' (guidance_scale) = {scale}, k = {k}; DDIM, 50 steps, 512 x 512 for SD 1.x.
N0 = the number of fine-tuning images (Clique Cluster n0); candidates N = 50 x N0. Over-saturated or speckled
candidates: lower w'."""


def node(key: str, class_type: str, title: str, widgets: dict | None = None, **links: str) -> dict:
    """One node of a spec: ``links`` map an input name to '<node key>.<output name>'."""
    return {"key": key, "type": class_type, "title": title, "widgets": widgets or {}, "links": links}


def dreambooth_models() -> list[dict]:
    return [
        node("pretrained", "CheckpointLoaderSimple", "Pretrained checkpoint", {"ckpt_name": BASE_FILE}),
        node("fine_tuned", "CheckpointLoaderSimple", "Fine-tuned checkpoint (DreamBooth)",
             {"ckpt_name": DREAMBOOTH_FILE}),
        node("caption", "CLIPTextEncode", "Training caption", {"text": "sks style"}, clip="fine_tuned.CLIP"),
        node("empty", "CLIPTextEncode", "Empty prompt", {"text": ""}, clip="pretrained.CLIP"),
    ]


def lora_models() -> list[dict]:
    return [
        node("pretrained", "CheckpointLoaderSimple", "Base checkpoint", {"ckpt_name": BASE_FILE}),
        node("fine_tuned", "LoraLoaderModelOnly", "LoRA under audit", {"lora_name": LORA_FILE, "strength_model": 1.0},
             model="pretrained.MODEL"),
        node("caption", "CLIPTextEncode", "Training caption", {"text": "sks style"}, clip="pretrained.CLIP"),
        node("empty", "CLIPTextEncode", "Empty prompt", {"text": ""}, clip="pretrained.CLIP"),
    ]


def model_files(kind: str) -> dict:
    """The report's file-name widgets matching the loaders above; the role without a file keeps the node's default,
    (none)."""
    if kind == "dreambooth":
        return {"pretrained_file": BASE_FILE, "fine_tuned_file": DREAMBOOTH_FILE}
    if kind == "flux":
        return {"pretrained_file": FLUX_BASE_FILE, "lora_file": FLUX_LORA_FILE}
    if kind == "sdxl_derivative":
        return {"pretrained_file": SDXL_DERIVATIVE_BASE_FILE, "lora_file": SDXL_LORA_FILE}
    return {"pretrained_file": BASE_FILE, "lora_file": LORA_FILE}


def guidance_widgets(kind: str, mode: str) -> dict:
    """The guidance of a sampler or bank; its other widgets keep the node's defaults (seed 0, the paper's 50 DDIM
    steps)."""
    scale, k = guidance_settings(kind, mode)
    return {"mode": mode, "guidance_scale": scale, "k": k}


MODEL_LINKS = {"fine_tuned": "fine_tuned.MODEL", "pretrained": "pretrained.MODEL", "positive": "caption.CONDITIONING",
               "negative": "empty.CONDITIONING", "latent_image": "latent.LATENT"}


def extraction(kind: str, suffix: str, label: str, name: str, embeddings: str, run_settings: str,
               **candidate_source: str) -> list[dict]:
    """Clique Cluster -> Extracted Images -> Audit Report (into output/finextract/<name>), on candidates embedded at
    ``embeddings`` and kept where ``candidate_source`` says (their images, or a bank and its VAE)."""
    return [
        node(f"cluster{suffix}", "FineXtractCliqueClusterV2", f"Clique cluster: {label}", {"n0": N0},
             embeddings=embeddings),
        node(f"extracted{suffix}", "FineXtractExtractedImages", f"Extracted images: {label}",
             clusters=f"cluster{suffix}.clusters", **candidate_source),
        node(f"report{suffix}", "FineXtractAuditReportV2", f"Audit report: {label}",
             {"folder_prefix": f"finextract/{name}", **model_files(kind)},
             extracted=f"extracted{suffix}.extracted", clusters=f"cluster{suffix}.clusters",
             run_settings=run_settings),
    ]


def bank_attack(kind: str, mode: str = "finextract", suffix: str = "", label: str = "FineXtract",
                name: str | None = None) -> list[dict]:
    """Candidate Bank -> clusters -> the extracted images decoded from the bank -> report, for one guidance mode, on
    the nodes keyed pretrained, fine_tuned, caption, empty and latent. The bank and the report go to
    output/finextract/<name>_bank and <name> (name: the kind and the suffix)."""
    bank, name = f"bank{suffix}", name or f"{kind}{suffix}"
    return [
        node(bank, "FineXtractCandidateBank", f"Candidate bank: {label}",
             {**guidance_widgets(kind, mode), "sscd_model": core("sscd").PAPER_MODEL_FILE, "num_candidates": 50 * N0,
              "batch_size": BANK_BATCH, "bank_folder": f"finextract/{name}_bank"},
             **MODEL_LINKS, vae="pretrained.VAE"),
        *extraction(kind, suffix, label, name, f"{bank}.embeddings", f"{bank}.run_settings", bank=f"{bank}.bank",
                    vae="pretrained.VAE"),
    ]


def one_batch_attack(kind: str) -> list[dict]:
    """Sampler -> decode -> SSCD -> clusters -> the extracted images taken from the batch -> report (into
    output/finextract/<kind>_one_batch)."""
    return [
        node("sample", "FineXtractModelGuidanceSampler", "Sampler: FineXtract",
             guidance_widgets(kind, "finextract"), **MODEL_LINKS),
        node("decode", "VAEDecode", "Decode: FineXtract", samples="sample.LATENT", vae="pretrained.VAE"),
        node("embed", "FineXtractSSCDEmbed", "SSCD embed: FineXtract", {"sscd_model": core("sscd").PAPER_MODEL_FILE},
             images="decode.IMAGE"),
        *extraction(kind, "", "FineXtract", f"{kind}_one_batch", "embed.embeddings", "sample.run_settings",
                    candidates="decode.IMAGE"),
    ]


def candidate_size() -> dict:
    return node("latent", "EmptyLatentImage", "Candidate size (its batch size is not used)",
                {"width": 512, "height": 512, "batch_size": 1})


def one_batch() -> dict:
    return node("latent", "EmptyLatentImage", "Candidates: N = 50 x N0",
                {"width": 512, "height": 512, "batch_size": 50 * N0})


def with_references(kind: str) -> list[dict]:
    """The bank attack plus the user's own images: metrics against them, and a report that shows both side by
    side."""
    nodes = [*(dreambooth_models() if kind == "dreambooth" else lora_models()), candidate_size(),
             *bank_attack(kind, name=f"{kind}_audit")]
    report = nodes[-1]
    report["links"].update(references="references.images", scores="metrics.scores",
                           reference_names="references.file_names")
    return nodes + [
        node("references", "FineXtractLoadReferenceImages", "My reference images",
             {"size": 512}),
        node("reference_embed", "FineXtractSSCDEmbed", "SSCD embed: my images",
             {"sscd_model": core("sscd").PAPER_MODEL_FILE}, images="references.images"),
        node("metrics", "FineXtractExtractionMetrics", "Extraction metrics",
             references="references.images", reference_embeddings="reference_embed.embeddings",
             extracted="extracted.extracted", extracted_embeddings="extracted.extracted_embeddings"),
    ]


def recovered_caption() -> list[dict]:
    """The DreamBooth attack with the caption recovered from the weights (Caption Inverter -> CLIPTextEncode)."""
    nodes = dreambooth_models()
    nodes[2:3] = [
        node("inverter", "FineXtractCaptionInverter", "Caption Inverter: recover the training caption",
             {"max_words": 3, "iterations": 1000, "restarts": 4, "seed": 0},
             pretrained="pretrained.MODEL", fine_tuned="fine_tuned.MODEL", clip="fine_tuned.CLIP"),
        node("caption", "CLIPTextEncode", "Recovered caption", {"text": ""}, clip="fine_tuned.CLIP",
             text="inverter.caption"),
    ]
    return [*nodes, candidate_size(), *bank_attack("dreambooth", name="dreambooth_recovered_caption")]


def flux_lora() -> list[dict]:
    """A Flux dev LoRA audit: the shift on the base before it branches (both models sample the same sigmas), the
    distilled guidance at FLUX_DEV_DEFAULTS on both prompts, real model guidance between the two models."""
    guidance = core("guidance").FLUX_DEV_DEFAULTS
    distilled = {"guidance": guidance["distilled_guidance"]}
    return [
        node("unet", "UNETLoader", "Flux dev base (diffusion model)", {"unet_name": FLUX_BASE_FILE}),
        node("clip", "DualCLIPLoader", "Flux text encoders",
             {"clip_name1": FLUX_CLIP_L_FILE, "clip_name2": FLUX_T5_FILE, "type": "flux"}),
        node("vae", "VAELoader", "Flux VAE", {"vae_name": FLUX_VAE_FILE}),
        node("pretrained", "ModelSamplingFlux", "Base: Flux's shift for the candidate size",
             {"width": FLUX_SIZE, "height": FLUX_SIZE}, model="unet.MODEL"),
        node("fine_tuned", "LoraLoaderModelOnly", "LoRA under audit",
             {"lora_name": FLUX_LORA_FILE, "strength_model": 1.0}, model="pretrained.MODEL"),
        node("caption_text", "CLIPTextEncode", "Training caption", {"text": "sks style"}, clip="clip.CLIP"),
        node("empty_text", "CLIPTextEncode", "Empty prompt", {"text": ""}, clip="clip.CLIP"),
        node("caption", "FluxGuidance", "Caption: distilled guidance", distilled,
             conditioning="caption_text.CONDITIONING"),
        node("empty", "FluxGuidance", "Empty prompt: distilled guidance", distilled,
             conditioning="empty_text.CONDITIONING"),
        node("latent", "EmptySD3LatentImage", "Candidate size (16-channel latent; its batch size is not used)",
             {"width": FLUX_SIZE, "height": FLUX_SIZE, "batch_size": 1}),
        node("bank", "FineXtractCandidateBank", "Candidate bank: FineXtract",
             {"mode": "finextract", "guidance_scale": guidance["scale"], "k": guidance["k"], "steps": FLUX_STEPS,
              "sampler_name": "euler", "scheduler": "simple", "sscd_model": core("sscd").PAPER_MODEL_FILE,
              "num_candidates": 50 * N0, "batch_size": FLUX_BANK_BATCH, "bank_folder": "finextract/flux_lora_bank"},
             **MODEL_LINKS, vae="vae.VAE"),
        *extraction("flux", "", "FineXtract", "flux_lora", "bank.embeddings", "bank.run_settings", bank="bank.bank",
                    vae="vae.VAE"),
    ]


def sdxl_derivative_lora() -> list[dict]:
    """An SDXL-derivative LoRA audit: Model Evidence reads the LoRA's recorded caption and checks the base connected
    against the base the LoRA names (the family check cannot tell SDXL bases apart); the caption feeds the encoder."""
    scale, k = guidance_settings("lora", "finextract")
    return [
        node("pretrained", "CheckpointLoaderSimple", "Base checkpoint (the SDXL derivative the LoRA names)",
             {"ckpt_name": SDXL_DERIVATIVE_BASE_FILE}),
        node("fine_tuned", "LoraLoaderModelOnly", "LoRA under audit",
             {"lora_name": SDXL_LORA_FILE, "strength_model": 1.0}, model="pretrained.MODEL"),
        node("evidence", "FineXtractModelEvidence", "Model Evidence: caption and base check",
             {"lora_file": SDXL_LORA_FILE}, base_model="pretrained.MODEL", base_clip="pretrained.CLIP"),
        node("caption", "CLIPTextEncode", "Training caption (from the LoRA's metadata)", {"text": ""},
             clip="pretrained.CLIP", text="evidence.caption"),
        node("empty", "CLIPTextEncode", "Empty prompt", {"text": ""}, clip="pretrained.CLIP"),
        node("latent", "EmptyLatentImage", "Candidate size (its batch size is not used)",
             {"width": SDXL_SIZE, "height": SDXL_SIZE, "batch_size": 1}),
        node("bank", "FineXtractCandidateBank", "Candidate bank: FineXtract",
             {"mode": "finextract", "guidance_scale": scale, "k": k, "sscd_model": core("sscd").PAPER_MODEL_FILE,
              "num_candidates": 50 * N0, "batch_size": SDXL_BANK_BATCH,
              "bank_folder": "finextract/sdxl_derivative_lora_bank"}, **MODEL_LINKS, vae="pretrained.VAE"),
        *extraction("sdxl_derivative", "", "FineXtract", "sdxl_derivative_lora", "bank.embeddings",
                    "bank.run_settings", bank="bank.bank", vae="pretrained.VAE"),
    ]


def attack_spec(kind: str, variant: str) -> dict:
    """The DreamBooth or LoRA attack through the Candidate Bank (variant "") or in one batch ("_one_batch")."""
    models = dreambooth_models() if kind == "dreambooth" else lora_models()
    intro = DREAMBOOTH_INTRO if kind == "dreambooth" else LORA_INTRO
    if variant == "_one_batch":
        return {"notes": [intro, ONE_BATCH_NOTE, defaults_note(kind), sscd_note(), OUTPUTS_NOTE],
                "nodes": [*models, one_batch(), *one_batch_attack(kind)]}
    return {"notes": [intro, BANK_NOTE, defaults_note(kind), sscd_note(), OUTPUTS_NOTE],
            "nodes": [*models, candidate_size(), *bank_attack(kind)]}


def specs() -> dict[str, dict]:
    """Every workflow: its notes (top left, in order) and its nodes."""
    cfg_scale, _ = guidance_settings("dreambooth", "cfg")
    scale, k = guidance_settings("dreambooth", "finextract")
    loose, strict = core("metrics").DEFAULT_ESR_THRESHOLDS
    return {
        **{f"finextract_{kind}{variant}": attack_spec(kind, variant) for variant in ("", "_one_batch")
           for kind in ("dreambooth", "lora")},
        "finextract_vs_baselines": {
            "notes": [f"""FINEXTRACT AND ITS BASELINES, SIDE BY SIDE
Three candidate banks on the same models, candidate size and seed: FineXtract (w' = {scale}, k = {k}), CFG on the
fine-tuned model (w' = {cfg_scale}) and direct text-to-image (the caption alone). Each gets its own bank, clusters and
report (output/finextract/dreambooth_<mode>/). With references, add Extraction Metrics per branch (see the audit
workflow): the paper finds FineXtract's clusters closer to the training images than either baseline's.""",
                      BANK_NOTE, defaults_note("dreambooth"), sscd_note(), OUTPUTS_NOTE],
            "nodes": [*dreambooth_models(), candidate_size(),
                      *bank_attack("dreambooth", "finextract", "_finextract", "FineXtract"),
                      *bank_attack("dreambooth", "cfg", "_cfg", "CFG baseline"),
                      *bank_attack("dreambooth", "direct", "_direct", "direct baseline")],
        },
        "finextract_recover_caption": {
            "notes": ["""FINEXTRACT WHEN THE TRAINING CAPTION IS UNKNOWN
The paper's Appendix A: Caption Inverter reads how the fine-tune changed the cross-attention key/value projections
and searches the prompt those changes answer to most. Its caption feeds the 'Recovered caption' encoder, then the
attack runs as in 'finextract_dreambooth'. It recovers words (a rare identifier such as 'sks', a subject), not the
exact caption: read its ranked captions and tokens (shown on the node) and, if you recognise a better prompt, type
it into a CLIPTextEncode instead (and give the bank a new bank_folder: its candidates depend on the caption). For a
LoRA: load the base in both roles and put LoraLoaderModelOnly on the fine-tuned side, as in 'finextract_lora'.
Caption Inverter defaults: max_words 3 (the paper: 3 and 7), iterations 1000 per restart (the paper), 4 restarts;
measured 0.5-1.9 s per iteration for SD 1.x's CLIP-L on a busy 2-core CPU (minutes to half an hour for 1000),
far faster on a GPU. Same seed, same caption.""",
                      BANK_NOTE, defaults_note("dreambooth"), sscd_note(), OUTPUTS_NOTE],
            "nodes": recovered_caption(),
        },
        "finextract_flux_lora": {
            "notes": [f"""FINEXTRACT ON A FLUX DEV LORA
Base: {FLUX_BASE_FILE} (models/diffusion_models), its text encoders (models/text_encoders) and VAE (models/vae), as in
ComfyUI's own Flux template; the LoRA under audit (models/loras) on the fine-tuned side. In the Audit Report pick the
same base and LoRA files: the report checks the base against the one the LoRA's metadata names.
Flux dev is guidance-distilled: the guidance value travels inside the conditioning (FluxGuidance). Both prompts go
through FluxGuidance {core("guidance").FLUX_DEV_DEFAULTS["distilled_guidance"]}: at 1 the distilled model gives its
plain conditional prediction, which model guidance (Eq. 13) combines; a higher value on the caption would put a second
CFG of the fine-tuned model alone inside it. The guidance is then real, between the two models: w' =
{core("guidance").FLUX_DEV_DEFAULTS["scale"]}, the best strength of the paper's Flux dev LoRA runs (its Appendix H),
k = {core("guidance").FLUX_DEV_DEFAULTS["k"]}, as for every LoRA. Each step runs two rows per candidate, as CFG does:
twice Flux dev's usual cost.
The shift (ModelSamplingFlux) sits on the base before it branches, so both inputs carry the same schedule (the
sampler takes the fine-tuned input's); it is part of the bank's settings. {FLUX_STEPS} steps of euler on the simple
schedule, a usual Flux dev setting (the paper gives no Flux steps). Flux schnell: load it instead, 4 steps; no FluxGuidance (it has no guidance
input). The Caption Inverter does not apply to Flux (no text-only cross-attention): type the trigger, or read it
with the Model Evidence node.""", family_bank_note("flux"), sscd_note(), OUTPUTS_NOTE],
            "nodes": flux_lora(),
        },
        "finextract_sdxl_derivative_lora": {
            "notes": [f"""FINEXTRACT ON A LORA FOR AN SDXL DERIVATIVE (PONY, ILLUSTRIOUS, NOOBAI, ...)
Base checkpoint: the derivative the LoRA was trained on, not SDXL base. They all share SDXL's architecture, so a LoRA
loaded on another of them runs without an error (ComfyUI maps every key) and the audit would extract the wrong
model's images. The Model Evidence node reads what the LoRA's trainer recorded: its caption (fed to the 'Training
caption' encoder; type one there instead if the LoRA records none) and its base (kohya's base SHA-256 and name),
compared with the weights of the base connected: its panel shows a WARNING when the base is another one. The Audit
Report compares the base file you pick with the recorded SHA-256 and writes the same warning at the top of the report.
w' = {scale}, k = {k}: the paper's LoRA defaults; 50 DDIM steps at {SDXL_SIZE} x {SDXL_SIZE}.""",
                      family_bank_note("sdxl"), sscd_note(), OUTPUTS_NOTE],
            "nodes": sdxl_derivative_lora(),
        },
        "finextract_audit_my_images": {
            "notes": [f"""AUDIT A LORA AGAINST MY OWN IMAGES
My reference images: a folder of your images (png, jpg, webp) inside ComfyUI's input folder, my_references for
input/my_references (upload them there, or ask the server's owner to allow another folder); each is centre-cropped.
The LoRA attack runs as in 'finextract_lora'; Extraction Metrics then finds, for each of your images, the closest
extracted image. AS = mean of those best SSCD similarities; A-ESR = share of your images whose best similarity
exceeds {loose} (loose) or {strict} (strict), the paper's thresholds. The report puts each of your images beside its
match. For a DreamBooth checkpoint, replace the LoRA loader by a second checkpoint loader (see
'finextract_dreambooth').""",
                      BANK_NOTE, defaults_note("lora"), sscd_note(), OUTPUTS_NOTE],
            "nodes": with_references("lora"),
        },
    }


def _depths(spec_nodes: list[dict]) -> dict[str, int]:
    """Column of each node: one right of its deepest input, so links run left to right."""
    by_key = {n["key"]: n for n in spec_nodes}
    depth: dict[str, int] = {}

    def visit(key: str) -> int:
        if key not in depth:
            sources = [source.split(".")[0] for source in by_key[key]["links"].values()]
            depth[key] = 1 + max((visit(s) for s in sources), default=-1)
        return depth[key]

    for key in by_key:
        visit(key)
    return depth


def widget_default(input_spec: list):
    """The value a new node of this type starts with (a combo's first option when it declares no default)."""
    options = input_spec[1] if len(input_spec) > 1 else {}
    if "default" in options:
        return options["default"]
    choices = input_spec[0] if isinstance(input_spec[0], list) else options.get("options", [])
    return choices[0] if choices else None


def _node_height(n_slots: int, n_widgets: int) -> int:
    return 40 + 22 * n_slots + 26 * n_widgets


def build_workflow(spec: dict, object_info: dict) -> dict:
    """The editor-format workflow of one spec: notes in a column on the left, nodes in columns by depth."""
    nodes, links = [], []
    depth = _depths(spec["nodes"])
    ids = {n["key"]: index + 1 + len(spec["notes"]) for index, n in enumerate(spec["nodes"])}
    types_by_key = {n["key"]: n["type"] for n in spec["nodes"]}
    column_bottom: dict[int, int] = {}
    note_y = 0
    for index, text in enumerate(spec["notes"]):
        height = 40 + 17 * (text.count("\n") + 1)
        nodes.append({"id": index + 1, "type": "Note", "pos": [0, note_y], "size": [520, height], "flags": {},
                      "order": index, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                      "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
        note_y += height + 30
    outputs_by_key = {}
    for order, spec_node in enumerate(spec["nodes"], start=len(spec["notes"])):
        info = object_info[spec_node["type"]]
        node_id = ids[spec_node["key"]]
        unknown = set(spec_node["widgets"]) | set(spec_node["links"])
        inputs, values = [], []
        for name, input_spec in ordered_inputs(info):
            unknown.discard(name)
            entry = {"name": name, "type": "COMBO" if isinstance(input_spec[0], list) else input_spec[0], "link": None}
            if is_widget(input_spec):
                entry["widget"] = {"name": name}
                values.append(spec_node["widgets"].get(name, widget_default(input_spec)))
                if widget_value_count(input_spec) == 2:
                    values.append("fixed")  # reproducible: the seed never changes behind the user's back
            if name in spec_node["links"]:
                source_key, output_name = spec_node["links"][name].split(".")
                source_info = object_info[types_by_key[source_key]]
                source_slot = source_info["output_name"].index(output_name)
                link_type = source_info["output"][source_slot]
                if link_type != entry["type"]:
                    raise TypeError(f"{spec_node['key']}.{name} takes {entry['type']}, {source_key}.{output_name} "
                                    f"gives {link_type}")
                link_id = len(links) + 1
                links.append([link_id, ids[source_key], source_slot, node_id, len(inputs), link_type])
                outputs_by_key.setdefault(source_key, {}).setdefault(source_slot, []).append(link_id)
                entry["link"] = link_id
            inputs.append(entry)
        if unknown:
            raise KeyError(f"{spec_node['type']} has no inputs {sorted(unknown)}")
        column = depth[spec_node["key"]]
        n_sockets = sum(1 for entry in inputs if "widget" not in entry)
        height = _node_height(max(n_sockets, len(info["output"])), len(values))
        y = column_bottom.get(column, 0)
        column_bottom[column] = y + height + 40
        nodes.append({
            "id": node_id, "type": spec_node["type"], "title": spec_node["title"],
            "pos": [600 + 380 * column, y], "size": [340, height], "flags": {}, "order": order, "mode": 0,
            "inputs": inputs, "outputs": [], "properties": {"Node name for S&R": spec_node["type"]},
            "widgets_values": values,
        })
    for spec_node, entry in zip(spec["nodes"], nodes[len(spec["notes"]):]):
        key = spec_node["key"]
        info = object_info[entry["type"]]
        entry["outputs"] = [{"name": name, "type": kind, "links": outputs_by_key.get(key, {}).get(slot, []),
                             "slot_index": slot}
                            for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.7, "offset": [40, 40]}}, "version": 0.4}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=WORKFLOWS_DIR, help="folder to write the workflows into")
    out = parser.parse_args(argv).out
    with tempfile.TemporaryDirectory() as base, ComfyServer(base, lab=False) as server:
        object_info = server.get("/object_info")
    os.makedirs(out, exist_ok=True)
    for name, spec in specs().items():
        path = os.path.join(out, f"{name}.json")
        with open(path, "w") as f:
            json.dump(build_workflow(spec, object_info), f, indent=2)
            f.write("\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
