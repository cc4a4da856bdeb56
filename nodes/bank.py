"""Candidate Bank: generate N candidates into an on-disk bank in batches, and decode chosen ones from it.

The bank (finextract_core.bank) keeps each candidate's latent and SSCD embedding on disk, so 6,900 candidates never
sit in memory as images, a cancelled or killed run resumes when queued again, and shards of an index range made on
other machines merge into one bank.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import comfy.model_management
import comfy.sample
import folder_paths
import nodes as comfy_nodes
import torch
from comfy.k_diffusion.sampling import BrownianTreeNoiseSampler
from comfy_api.latest import io

from ..finextract_core import sscd
from ..finextract_core.bank import CandidateBank, CandidateStepNoise, candidate_noise, candidate_seed, fingerprint
from ..finextract_core.embeddings import Embeddings
from .embedding import NO_FILE, SSCD_FOLDER, embed_managed, load_sscd, missing_file_message, validate_model_file
from .guider import MODEL_SAMPLING, build_guider
from .paths import BANK_FOLDER, resolve_folder, validate_folder
from .report import NO_FILE as NO_MODEL_FILE
from .sampling import _guidance_inputs, describe_run, sample_with_guider, sampling_inputs
from .types import CANDIDATE_BANK, EMBEDDINGS, IMAGE_EMBEDDER, RUN_SETTINGS

LOG = logging.getLogger("finextract")
CATEGORY = "FineXtract/sampling"
# Bump when the way a candidate is generated from its key changes, so old banks are not resumed with new candidates.
# v2: the SDE samplers below draw their step noise from one Brownian tree per candidate.
GENERATION_SCHEME = "per-candidate-noise-v2"
# Samplers whose step noise ComfyUI draws from a Brownian tree. dpmpp_sde asks for the noise of overlapping intervals
# within a step, which must be correlated as Brownian motion's are, so independent draws would change the sampler.
# Every other sampler gets independent draws. tests/host/test_host_compat.py runs each of the host's samplers with
# ComfyUI's own noise and checks this list against what it draws, so a new sampler cannot silently get other noise.
BROWNIAN_TREE_SAMPLERS = ("dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun",
                          "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu")


@dataclass(frozen=True)
class BankRows:
    """What the Candidate Bank node outputs: its bank, the candidate index of each row of its EMBEDDINGS, and those
    embeddings (so that clusters of other embeddings are refused)."""

    bank: CandidateBank
    candidates: tuple[int, ...]
    embeddings: Embeddings


def model_identity(patcher) -> str:
    """The denoiser's own weights (before any in-place patching) and its weight patches (LoRA and the like)."""
    return fingerprint(patcher.get_key_patches("diffusion_model."))


def schedule_identity(patcher) -> dict:
    """The sampling schedule where a node replaced the model's own (ModelSamplingFlux, ModelSamplingSD3, ...: their
    shift changes every sigma): its classes and buffers. Empty otherwise, since the model's own schedule follows from
    its weights and config, so that banks made before this field existed keep their key."""
    schedule = patcher.object_patches.get(MODEL_SAMPLING)
    if schedule is None:
        return {}
    classes = [cls.__name__ for cls in type(schedule).__mro__ if cls.__module__.startswith("comfy")]
    return {"model_sampling": fingerprint({"classes": classes, "buffers": schedule.state_dict()})}


class CandidateBankNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractCandidateBank",
            display_name="Candidate Bank (FineXtract)",
            category=CATEGORY,
            is_output_node=True,  # it writes the bank, so it runs even when nothing reads its outputs
            description="Generates N candidates with model guidance in batches and stores each batch on disk (latents "
                        "and SSCD embeddings) as soon as it is done: memory stays flat in N, a cancelled or killed run "
                        "resumes when queued again, and index ranges made on several machines merge into one bank.",
            inputs=_guidance_inputs() + [
                io.Latent.Input("latent_image", tooltip="Gives the candidates' size only (EmptyLatentImage at the "
                                "resolution to sample); its batch size and content are ignored."),
                *sampling_inputs(),
                io.Vae.Input("vae", tooltip="Decodes each batch for embedding only; the images are not kept."),
                io.Combo.Input("sscd_model", options=folder_paths.get_filename_list(SSCD_FOLDER) or [NO_FILE],
                               tooltip=f"SSCD weights in models/sscd/ for the candidates' embeddings (the paper uses "
                               f"sscd_disc_large: {sscd.PAPER_MODEL_URL})."),
                io.Combo.Input("preset", options=sorted(sscd.PRESETS), default=sscd.DEFAULT_PRESET,
                               tooltip="SSCD preprocessing; compare only with embeddings of the same preset."),
                io.Int.Input("num_candidates", default=500, min=1, max=1_000_000,
                             tooltip="N: how many candidates (the paper: 50 x N0). Raising it later keeps the ones "
                             "already in the bank and adds the rest."),
                io.Int.Input("first_candidate", default=0, min=0, max=1_000_000,
                             tooltip="Index of the first candidate. 0 for a whole run; to split a run across "
                             "machines give each an index range (0 and N/2, then N/2 and N/2) and merge the banks."),
                io.Int.Input("batch_size", default=4, min=1, max=1024,
                             tooltip="Candidates per batch (as much as fits in GPU memory). Does not change the "
                             "candidates: candidate i always comes from the same noise."),
                io.String.Input("bank_folder", default=BANK_FOLDER.example,
                                tooltip="Folder of this bank, inside ComfyUI's output folder (a relative path goes "
                                "under it; folders elsewhere only where the server's owner allowed them). Use one "
                                "folder per setting: a folder that holds a bank of other settings is refused."),
                IMAGE_EMBEDDER.Input("embedder", optional=True,
                                     tooltip="Optional: another image embedder for the candidates (such as the lab's "
                                     "descriptor for its 32 px world); sscd_model and preset are then not used."),
            ],
            outputs=[
                EMBEDDINGS.Output(display_name="embeddings",
                                  tooltip="The embeddings of candidates first_candidate .. first_candidate + N - 1, "
                                  "row j = candidate first_candidate + j."),
                CANDIDATE_BANK.Output(display_name="bank",
                                      tooltip="The bank, for Extracted Images: it decodes only the clusters' centres."),
                io.String.Output(display_name="settings_json", tooltip="The run settings as JSON, to read."),
                RUN_SETTINGS.Output(display_name="run_settings",
                                    tooltip="Everything that determined the candidates, for the Audit Report (the "
                                    "same fields as the Model Guidance Sampler's)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, sscd_model, bank_folder) -> bool | str:
        # "No file" passes (the list's own, or the audit's "(none)"): a connected embedder (a link, unknown here) needs
        # none; without one the run says so.
        checked = (True if sscd_model in (NO_FILE, NO_MODEL_FILE)
                   else validate_model_file(SSCD_FOLDER, sscd_model, missing_file_message))
        return validate_folder(BANK_FOLDER, bank_folder) if checked is True else checked

    @classmethod
    def fingerprint_inputs(cls, bank_folder, **kwargs):
        # Run again when the folder changed (shards merged in or deleted), not only when an input did.
        try:
            return os.stat(resolve_folder(BANK_FOLDER, bank_folder)).st_mtime_ns
        except (OSError, ValueError):
            return None

    @classmethod
    def execute(cls, fine_tuned, pretrained, positive, negative, mode, guidance_scale, k, latent_image, seed, steps,
                sampler_name, scheduler, vae, sscd_model, preset, num_candidates, first_candidate, batch_size,
                bank_folder, embedder=None) -> io.NodeOutput:
        folder = resolve_folder(BANK_FOLDER, bank_folder)  # first: a refused folder costs no model loading
        guider = build_guider(fine_tuned, pretrained, positive, negative, mode, guidance_scale, k)
        patcher = guider.model_patcher
        shape = tuple(comfy.sample.fix_empty_latent_channels(patcher, latent_image["samples"]).shape[1:])
        if embedder is None:
            sscd_patcher = load_sscd(sscd_model)
            identity = {"embedder": sscd_patcher.model.model_id,
                        "embedder_weights": fingerprint(sscd_patcher.model.state_dict()), "preset": preset}

            def embed(images):
                return embed_managed(sscd_patcher, lambda model, device: sscd.embed_images(
                    model, images, preset, batch_size=len(images), device=device))
        else:
            identity = {"embedder": embedder.model_id, "embedder_weights": embedder.identity, "preset": embedder.preset}
            embed = embedder.embed
        settings = describe_run(guider, mode, guidance_scale, k, seed, steps, sampler_name, scheduler, 1.0,
                                latent_shape=shape, candidates=num_candidates, first_candidate=first_candidate,
                                noise=GENERATION_SCHEME)
        key = {
            **settings.candidate_key(), "fine_tuned": model_identity(fine_tuned),
            "pretrained": model_identity(pretrained), "positive": fingerprint(positive),
            "negative": fingerprint(negative), "vae": fingerprint(vae.first_stage_model.state_dict()), **identity,
            **schedule_identity(patcher),
        }
        bank = CandidateBank.open(folder, key)
        wanted = range(first_candidate, first_candidate + num_candidates)
        todo = bank.missing(wanted)
        LOG.info("finextract: bank %s holds %d of candidates %d-%d; generating %d", bank.folder,
                 num_candidates - len(todo), wanted.start, wanted.stop - 1, len(todo))
        for start in range(0, len(todo), batch_size):
            comfy.model_management.throw_exception_if_processing_interrupted()
            indices = todo[start:start + batch_size]
            latent = {"samples": torch.zeros((len(indices), *shape))}
            # Sampling loads the UNets through model management, which offloads the embedder if they need the room.
            samples = sample_with_guider(
                guider, latent, seed, steps, sampler_name, scheduler, 1.0,
                noise=candidate_noise(seed, indices, shape),
                step_noise=candidate_step_noise(sampler_name, seed, indices, shape, patcher))["samples"]
            images = comfy_nodes.VAEDecode().decode(vae, {"samples": samples})[0]
            bank.write(indices, samples, embed(images))
            done = num_candidates - len(todo) + min(start + batch_size, len(todo))
            LOG.info("finextract: %d of %d candidates in the bank", done, num_candidates)
        embeddings = bank.embeddings(wanted)
        return io.NodeOutput(embeddings, BankRows(bank, tuple(wanted), embeddings), settings.to_json(), settings)


def candidate_step_noise(sampler_name: str, seed: int, indices: list[int], shape: tuple, patcher):
    """The noise sampler for the steps of a batch of candidates: each candidate's noise depends only on (seed, i).

    Brownian-tree samplers get ComfyUI's own tree, one per candidate (seeded like CandidateStepNoise), over the
    model's whole sigma range: the same distribution as ComfyUI's tree over the schedule's range, whatever the batch.
    """
    if sampler_name not in BROWNIAN_TREE_SAMPLERS:
        return CandidateStepNoise(seed, indices, shape, device=patcher.load_device)
    seeds = [candidate_seed(seed, i, "steps") for i in indices]
    sigma_max = float(patcher.get_model_object(MODEL_SAMPLING).sigma_max)
    return BrownianTreeNoiseSampler(torch.zeros((len(indices), *shape)), 0.0, sigma_max, seed=seeds, cpu=True)


def decode_candidates(bank: BankRows, vae, positions: list[int]) -> torch.Tensor:
    """The IMAGE of the candidates at ``positions`` (rows of the bank's EMBEDDINGS), decoded from their latents."""
    outside = [p for p in positions if not 0 <= p < len(bank.candidates)]
    if outside:
        raise ValueError(f"positions {outside} are outside the bank's {len(bank.candidates)} embeddings (0 to "
                         f"{len(bank.candidates) - 1}): use indices of the embeddings this bank output")
    latents = bank.bank.latents([bank.candidates[p] for p in positions])
    return comfy_nodes.VAEDecode().decode(vae, {"samples": latents})[0]


NODES = [CandidateBankNode]
