"""ModelEvidence: the evidence a LoRA or checkpoint file carries (finextract_core.evidence) as outputs a workflow can
wire into the attack (the training caption, N0, the base model), and, given the base MODEL / CLIP, how much of the
LoRA that base takes by ComfyUI's own key maps.

ComfyUI applies a LoRA's keys that match a layer of the model it is loaded on and only logs "lora key not loaded" for
the others, so a LoRA on the wrong base, or in a key format this ComfyUI does not map, half-applies without an error.
The count here comes from the same functions LoraLoader uses (comfy.lora.model_lora_keys_unet / model_lora_keys_clip
and comfy.lora.load_lora), run on the LoRA's tensors without patching anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import comfy.lora
import comfy.lora_convert
import torch
import comfy.utils
import folder_paths
from comfy_api.latest import io

from safetensors import safe_open

from ..finextract_core.evidence import (
    FAMILY_NAMES,
    BaseCheck,
    BaseFit,
    Evidence,
    EvidenceError,
    families_agree,
    read_evidence,
    recorded_base,
)
from ..finextract_core.evidence_tensors import is_text_encoder_key
from ..finextract_core.hashing import FileHashes, default_cache_file
from .guider import describe_family
from .report import NO_FILE, ROLE_FOLDERS, model_file_options

CATEGORY = "FineXtract/evidence"
# Carries finextract_core.evidence.Evidence: the file's leads, their sources and problems, and the base fit.
EVIDENCE = io.Custom("FINEXTRACT_EVIDENCE")
# ComfyUI's model classes (comfy/supported_models.py) as the evidence reader names their families.
COMFY_FAMILIES = {"SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2", "SDXL": "sdxl",
                  "SDXLRefiner": "sdxl-refiner", "SSD1B": "ssd-1b", "Segmind_Vega": "vega", "SD3": "sd3",
                  "Flux": "flux", "FluxSchnell": "flux", "Chroma": "chroma", "Lumina2": "lumina2",
                  "AuraFlow": "auraflow", "PixArtSigma": "pixart", "HunyuanImage21": "hunyuan-image"}
FILE_ROLES = (("lora_file", "lora"), ("model_file", "fine_tuned"))


def model_file_path(role: str, name: str) -> str:
    """The full path of a file its loader lists under this role's folders."""
    for folder in ROLE_FOLDERS[role]:
        path = folder_paths.get_full_path(folder, name)
        if path:
            return path
    raise FileNotFoundError(f"'{name}' is no longer in models/{{{','.join(ROLE_FOLDERS[role])}}}: press 'r' in the "
                            "graph to refresh the file lists and pick it again")


def local_checkpoints() -> list[tuple[str, str]]:
    """(name as the loaders list it, full path) of every checkpoint and diffusion model the user has."""
    return [(name, folder_paths.get_full_path(folder, name)) for folder in ROLE_FOLDERS["pretrained"]
            for name in folder_paths.get_filename_list(folder)]


class _RecordingLoRA(dict):
    """A LoRA's tensors that remember which keys ComfyUI's loader read: the ones a layer of the base took (load_lora
    reads a key exactly when it adds it to the keys it loaded)."""

    def __init__(self, tensors: dict):
        super().__init__(tensors)
        self.read: set[str] = set()

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def base_fit(path: str, model=None, clip=None) -> BaseFit:
    """How many of the LoRA's keys ComfyUI's loader maps onto a layer of ``model`` / ``clip`` (either may be None:
    the keys for the missing part are counted as unchecked)."""
    key_map: dict = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    tensors = _RecordingLoRA(comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(path, safe_load=True)))
    patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    missing = sorted(set(tensors) - tensors.read)
    if clip is None:
        unchecked = [key for key in missing if is_text_encoder_key(key)]
    elif model is None:
        unchecked = [key for key in missing if not is_text_encoder_key(key)]
    else:
        unchecked = []
    if model is not None:
        base, family = describe_family(model), COMFY_FAMILIES.get(type(model.model.model_config).__name__)
    else:
        base, family = type(clip.cond_stage_model).__name__, None
    return BaseFit(base=base, base_family=family, keys=len(tensors), loaded=len(tensors.read),
                   layers_patched=len(patches), not_loaded=tuple(k for k in missing if k not in unchecked),
                   unchecked=tuple(unchecked))


# Layers compared between the connected base MODEL and the file the LoRA names (evenly spread over the denoiser):
# two different trainings of one architecture differ in every layer.
COMPARED_LAYERS = 32
CHECKPOINT_PREFIX = "model."  # a full checkpoint holds the denoiser under model.diffusion_model.


def _different_layers(path: str, base_model) -> tuple[int, int]:
    """(layers that differ, layers compared) between the denoiser weights in the file at ``path`` and the MODEL's own
    (unpatched) weights, on up to COMPARED_LAYERS layers both have."""
    weights = base_model.get_key_patches("diffusion_model.")
    with safe_open(path, framework="pt") as file:
        names = {}
        for key in file.keys():
            name = key[len(CHECKPOINT_PREFIX):] if key.startswith(CHECKPOINT_PREFIX) else f"diffusion_model.{key}"
            if name in weights:
                names[name] = key
        common = sorted(names)
        chosen = [common[round(i * (len(common) - 1) / max(1, COMPARED_LAYERS - 1))]
                  for i in range(min(COMPARED_LAYERS, len(common)))]
        differ = 0
        for name in dict.fromkeys(chosen):
            stored = file.get_tensor(names[name]).float()
            own = weights[name][0][0].detach().to("cpu", torch.float32)
            # Within 1% of the layer's scale: the same weights loaded in another dtype, not another training.
            differ += own.shape != stored.shape or bool((own - stored).abs().max() > 0.01 * stored.abs().max() + 1e-6)
    return differ, len(dict.fromkeys(chosen))


def check_base_model(evidence: Evidence, base_model) -> BaseCheck:
    """The LoRA's recorded base against the base MODEL connected. A MODEL does not say which file it was loaded from
    (ComfyUI 0.3.75 keeps no path on it), so the file the LoRA names is found among the user's checkpoints (by
    SHA-256, else by name) and its weights are compared with the MODEL's."""
    name, sha256, described = recorded_base(evidence)
    connected = describe_family(base_model)
    if name is None and sha256 is None:
        return BaseCheck("unknown", None, None, connected, None, None,
                         f"{evidence.name} records no base model, so the base MODEL cannot be checked against it")
    match = evidence.base_matches[0] if evidence.base_matches else None
    if match is None:
        return BaseCheck("unknown", name, sha256, connected, None, None, (
            f"{evidence.name} records its base as {described}, which is not among your checkpoints, so the base "
            "MODEL cannot be checked against it: put that file in models/checkpoints (or models/diffusion_models)"))
    differ, compared = _different_layers(model_file_path("pretrained", match.name), base_model)
    if compared == 0:
        return BaseCheck("unknown", name, sha256, connected, match.sha256, None, (
            f"{match.name}, the base {evidence.name} records, names its layers otherwise than the base MODEL: "
            "they cannot be compared"))
    if differ == 0:
        return BaseCheck("same", name, sha256, match.name, match.sha256, "weights", (
            f"the base MODEL has the weights of {match.name}, the base {evidence.name} records (found by "
            f"{', '.join(match.by)}; {compared} layers compared)"))
    return BaseCheck("different", name, sha256, connected, match.sha256, "weights", (
        f"WARNING: the base MODEL is not {match.name}, the base {evidence.name} records ({differ} of {compared} layers "
        "compared differ). A LoRA audited on another base of the same architecture (SDXL base, Pony, Illustrious, "
        f"NoobAI) runs without an error and extracts the wrong model's images: load {match.name} as the base"))


def summary(evidence: Evidence, base_check: BaseCheck | None = None) -> str:
    """A few lines for the node's panel: what was found, where from, and what is wrong."""
    family = evidence.family
    lines = [f"{evidence.name}: {evidence.kind.value}, "
             + (f"{FAMILY_NAMES.get(family.value, family.value)} (from {family.source})" if family else
                "family unknown")]
    caption = evidence.caption
    lines.append(f"caption: {caption.text!r} (from {', '.join(caption.sources)})" if caption else
                 "caption: none recorded: use the Caption Inverter")
    lines.append(f"N0: {evidence.n0.value} (from {evidence.n0.source})")
    if evidence.base_matches:
        best = evidence.base_matches[0]
        lines.append(f"base: {best.name} (matched by {', '.join(best.by)})")
    elif evidence.base_name:
        lines.append(f"base: {evidence.base_name.value!r} recorded, not among your checkpoints")
    fit = evidence.base_fit
    if fit is not None:
        checked = fit.keys - len(fit.unchecked)
        lines.append(f"base fit: {fit.loaded} of {checked} LoRA keys loaded by {fit.base}"
                     + (f" ({len(fit.unchecked)} text-encoder keys unchecked: connect the base CLIP)"
                        if fit.unchecked else ""))
        if fit.not_loaded:
            lines.append(f"WARNING: {len(fit.not_loaded)} keys match no layer of this base (ComfyUI only logs 'lora "
                         "key not loaded' for them): a LoRA for another base, or a format this ComfyUI does not map")
        if family is not None and fit.base_family is not None and not families_agree(family.value, fit.base_family):
            lines.append(f"WARNING: the file is {FAMILY_NAMES.get(family.value, family.value)}, the base MODEL is "
                         f"{FAMILY_NAMES.get(fit.base_family, fit.base_family)}")
    if base_check is not None:
        lines.append(f"base check: {base_check.message}")
    lines += [f"problem: {p.source} {p.message}" for p in evidence.problems]
    lines.append("Metadata is a lead, never proof: the JSON names the source of every value.")
    return "\n".join(lines)


class ModelEvidence(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractModelEvidence",
            display_name="Model Evidence (FineXtract)",
            category=CATEGORY,
            description="Reads what a LoRA or checkpoint file's trainer recorded in its safetensors header (kohya, "
                        "ModelSpec, ai-toolkit, SimpleTuner, diffusers), never its tensors: a proposed training "
                        "caption, N0 (the number of training images), the base model, resolution, clip skip and "
                        "prediction type, each with the key it came from and checked against the tensors' names and "
                        "shapes. Metadata can be edited by anyone: a lead, never proof.",
            inputs=[
                io.Combo.Input("lora_file", options=model_file_options("lora"), default=NO_FILE,
                               tooltip="The LoRA under audit (models/loras), as LoraLoaderModelOnly lists it. Pick "
                               "this or model_file."),
                io.Combo.Input("model_file", options=model_file_options("fine_tuned"), default=NO_FILE,
                               tooltip="Or a fine-tuned checkpoint or UNet (models/checkpoints, "
                               "models/diffusion_models), as its loader lists it."),
                io.Model.Input("base_model", optional=True,
                               tooltip="Optional: the base MODEL you mean to load the LoRA on. The JSON then counts "
                               "the LoRA's keys that match one of its layers by ComfyUI's own key maps, so a LoRA "
                               "that would half-apply is visible, and compares its weights with the base file the "
                               "LoRA records (kohya's base SHA-256 or name): a warning when it is another base of "
                               "the same architecture (Pony, Illustrious or NoobAI instead of SDXL base)."),
                io.Clip.Input("base_clip", optional=True,
                              tooltip="Optional: the base CLIP, so that the LoRA's text-encoder keys are counted too."),
            ],
            outputs=[
                io.String.Output(display_name="caption", tooltip="The proposed training caption (its sources are in "
                                 "the JSON); empty when the file records none: use the Caption Inverter."),
                io.Int.Output(display_name="n0", tooltip="N0 for Clique Cluster: the training images the file "
                              "records (repeats not counted), else a stated default."),
                io.String.Output(display_name="base_model_name", tooltip="The checkpoint of yours whose SHA-256 (or "
                                 "name) the file records as its base, as its loader lists it; else the name the "
                                 "trainer recorded; else empty."),
                io.String.Output(display_name="evidence_json", tooltip="Every lead with the header key it came "
                                 "from, the problems found and the base fit (one JSON object, keys sorted)."),
                EVIDENCE.Output(display_name="evidence", tooltip="The same, as a value for the audit and report."),
            ],
            is_output_node=True,  # queued alone, it shows the file's evidence in its panel
        )

    @classmethod
    def validate_inputs(cls, lora_file, model_file) -> bool | str:
        """ComfyUI does not check V3 combo values itself: refuse a name no loader lists before anything runs."""
        for input_name, role in FILE_ROLES:
            name = {"lora_file": lora_file, "model_file": model_file}[input_name]
            if name is not None and name not in model_file_options(role):  # None: the value comes from a link
                return (f"{input_name} '{name}' is not in models/{{{','.join(ROLE_FOLDERS[role])}}}: pick a file "
                        f"from the list (press 'r' to refresh it), or {NO_FILE}")
        return True

    @classmethod
    def fingerprint_inputs(cls, lora_file, model_file, **kwargs):
        """Run again when the chosen file changes on disk under the same name."""
        stamps = []
        for (_, role), name in zip(FILE_ROLES, (lora_file, model_file)):
            if name and name != NO_FILE:
                try:
                    stat = os.stat(model_file_path(role, name))
                    stamps.append((name, stat.st_size, stat.st_mtime_ns))
                except OSError:
                    stamps.append((name, None, None))
        return tuple(stamps)

    @classmethod
    def execute(cls, lora_file, model_file, base_model=None, base_clip=None) -> io.NodeOutput:
        chosen = [(role, name) for (_, role), name in zip(FILE_ROLES, (lora_file, model_file)) if name != NO_FILE]
        if len(chosen) != 1:
            raise ValueError("pick one file: a LoRA in lora_file or a checkpoint / UNet in model_file, and set the "
                             f"other to {NO_FILE}")
        role, name = chosen[0]
        path = model_file_path(role, name)
        hashes = FileHashes(default_cache_file())
        try:
            evidence = read_evidence(path, name=name, hashes=hashes, bases=local_checkpoints())
        except EvidenceError as error:
            raise ValueError(str(error)) from error
        base_check = None
        if base_model is not None or base_clip is not None:
            if not evidence.is_lora:
                raise ValueError(f"{name} is a {evidence.kind.value}, not a LoRA: the base fit counts a LoRA's keys. "
                                 "Disconnect base_model and base_clip for this file")
            if not evidence.complete:
                raise ValueError(f"{name} is truncated, so ComfyUI cannot load it: download or copy it again")
            evidence = replace(evidence, base_fit=base_fit(path, base_model, base_clip))
        base_check = check_base_model(evidence, base_model) if base_model is not None and evidence.is_lora else None
        if evidence.base_matches:
            base_name = evidence.base_matches[0].name
        else:
            base_name = str(evidence.base_name.value) if evidence.base_name else ""
        text = summary(evidence, base_check)
        record = evidence.to_dict()
        if base_check is not None:
            record["base_check"] = base_check.to_dict()
        # The evidence in the UI values too, so a client over the HTTP API (finextract-audit) reads the base fit.
        return io.NodeOutput(evidence.caption.text if evidence.caption else "", int(evidence.n0.value), base_name,
                             json.dumps(record, sort_keys=True, ensure_ascii=True), evidence,
                             ui={"text": [text], "finextract_evidence": [record]})


NODES = [ModelEvidence]
