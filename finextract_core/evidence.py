"""The evidence a model file already carries: what its trainer wrote into the safetensors header, checked against
what its tensors show, each value with the key it came from.

Read from the header alone (evidence_header.py), never the tensors: kohya sd-scripts' ``ss_*`` keys, Stability's
ModelSpec (``modelspec.*``, which kohya and SimpleTuner write), ai-toolkit's (``software``, ``ss_base_model_version``
in its own vocabulary, its trigger word in ``ss_tag_frequency``), SimpleTuner's ``trained_words`` and diffusers'
``lora_adapter_metadata`` (the PEFT LoraConfig). From them: the kind of file and its base model family, the base's name
and hashes (matched against the checkpoints the user has), a proposed training caption, N0 (the number of training
images, which FineXtract's clustering needs), and the resolution, clip skip and prediction type it was trained at.

Metadata can be edited by anyone: every value is a lead, never proof. Where the tensors can check a claim (the family,
the kind, kohya's ``sshs_model_hash`` of the tensors) they do, and a contradiction is reported, never hidden; so is
metadata that is not valid JSON. A file with no metadata (kohya ``--no_metadata``, extracted LoRAs, diffusers PEFT
files) still gets its kind and family from its tensors, and says which fallbacks apply: the Caption Inverter for the
caption, a default N0.

Command: ``python -m finextract_core.evidence FILE... [--bases DIR]`` prints one JSON object per file, one per line,
keys sorted: the same file gives the same bytes.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace

from .evidence_header import EvidenceError, Header, read_header
from .evidence_tensors import is_text_encoder_key, lora_layers, lora_rank, read_family, read_kind
from .hashing import FileHashes, default_cache_file

SCHEMA = "finextract.evidence/1"
TRUST = ("Metadata can be written and edited by anyone: every value here is a lead, never proof. 'source' names the "
         "header key it was read from ('tensors': the tensors' names and shapes; 'default': nothing in the file). "
         "Where the tensors contradict the metadata, the tensors are used and the contradiction is listed in "
         "'problems'.")
# The clustering's N0 when the file records no image count: the Clique Cluster node's own default, and within the
# 4-20 images per concept of the paper's DreamBooth and WikiArt sets.
DEFAULT_N0 = 10
CAPTION_FALLBACK = ("no caption is recorded: recover one from the weights with the Caption Inverter node "
                    "(FineXtract/caption), or type the caption if you know it")
MAX_CAPTION_TAGS = 20
MAX_HINT_CHARS = 500

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner", "ssd-1b": "SSD-1B",
                "vega": "Segmind Vega", "sd3": "SD 3", "flux": "FLUX.1", "chroma": "Chroma", "lumina2": "Lumina 2",
                "auraflow": "AuraFlow", "pixart": "PixArt", "hunyuan-image": "HunyuanImage 2.1"}
# Families the tensors cannot tell apart from the one they show (distilled SDXLs read SDXL's 2048-wide context).
TENSOR_FAMILY_COVERS = {"sdxl": {"sdxl", "ssd-1b", "vega"}, "flux": {"flux", "chroma"}}

# ss_base_model_version in both vocabularies -> (family, prediction type it implies).
BASE_MODEL_VERSIONS = {
    # kohya sd-scripts: model_util.get_model_version_str_for_sd1_sd2, sdxl/flux/lumina/hunyuan utils, SD3 model types
    "sd_v1": ("sd1", None), "sd_v1_v": ("sd1", "v"), "sd_v2": ("sd2", None), "sd_v2_v": ("sd2", "v"),
    "sdxl_base_v1-0": ("sdxl", None), "flux1": ("flux", None), "chroma": ("chroma", None),
    "lumina2": ("lumina2", None), "hunyuan-image-2.1": ("hunyuan-image", None),
    "sd3m": ("sd3", None), "medium": ("sd3", None), "5-medium": ("sd3", None), "5-large": ("sd3", None),
    # ai-toolkit: StableDiffusion.get_base_model_version and toolkit/metadata.py add_base_model_info_to_meta
    "sd_1.5": ("sd1", None), "sd_2.1": ("sd2", None), "sdxl_1.0": ("sdxl", None), "flux.1": ("flux", None),
    "sd_3": ("sd3", None), "pixart": ("pixart", None), "auraflow": ("auraflow", None), "ssd": ("ssd-1b", None),
    "vega": ("vega", None),
}
# modelspec.architecture before its "/<adapter>": kohya's sai_model_spec ARCH_* ids and SimpleTuner's
# "<model_family>-<flavour>"; the longest matching prefix wins.
ARCHITECTURE_PREFIXES = {
    "stable-diffusion-v1": ("sd1", None), "stable-diffusion-v2-768-v": ("sd2", "v"),
    "stable-diffusion-v2": ("sd2", None),
    "stable-diffusion-xl-v1-refiner": ("sdxl-refiner", None), "stable-diffusion-xl": ("sdxl", None),
    "stable-diffusion-3": ("sd3", None), "flux-1": ("flux", None), "chroma": ("chroma", None),
    "lumina": ("lumina2", None), "hunyuan-image": ("hunyuan-image", None),
    "sd1x": ("sd1", None), "sd2x": ("sd2", None), "sdxl-refiner": ("sdxl-refiner", None), "sdxl": ("sdxl", None),
    "sd3": ("sd3", None), "flux-": ("flux", None), "pixart": ("pixart", None), "auraflow": ("auraflow", None),
}
ADAPTER_KINDS = {"lora": {"lora", "lycoris"}, "lycoris": {"lora", "lycoris"}, "textual-inversion": {"embedding"}}
PREDICTION_TYPES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v", "v_prediction": "v", "v-prediction": "v",
                    "flow": "flow", "flow_matching": "flow"}
HEX64, HEX8 = re.compile(r"^(0x)?[0-9a-fA-F]{64}$"), re.compile(r"^[0-9a-fA-F]{8}$")
KOHYA_SUBSET = re.compile(r"^(\d+)_(.+)$")  # kohya's DreamBooth folder "<repeats>_<class tokens>"
REPEATED_DIR = re.compile(r"^(.*) \(\d+\)$")  # kohya's name for a folder used a second time: "<dir> (2)"
HINT_KEYS = ("ss_output_name", "ss_training_comment", "modelspec.title", "modelspec.description",
             "modelspec.usage_hint", "modelspec.tags")
MISSING = ("", "None", "none", "null")  # kohya writes str(None) for an unset option
MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class Lead:
    """A value read from the file and where it came from: a header key, 'tensors', or 'default'."""
    value: object
    source: str
    raw: str | None = None  # the text in the file, when the value was derived from it
    note: str | None = None


@dataclass(frozen=True)
class CaptionCandidate:
    text: str
    sources: tuple[str, ...]
    priority: int  # 1: the words the training captions shared; 2: the instance prompt / class tokens; 3: a trigger
    images: int  # training images behind it, when known (0: unknown)
    note: str


@dataclass(frozen=True)
class BaseMatch:
    """A checkpoint of the user's that the file's base-model record points to, and how."""
    name: str
    by: tuple[str, ...]  # "sha256", "legacy hash", "name", "file stem"
    sha256: str | None
    family: str | None  # from the candidate's own tensors


@dataclass(frozen=True)
class BaseFit:
    """How much of a LoRA a given base model takes, by ComfyUI's own key maps (filled in by the node)."""
    base: str
    base_family: str | None
    keys: int
    loaded: int
    layers_patched: int
    not_loaded: tuple[str, ...]
    unchecked: tuple[str, ...]  # keys for a part of the model that was not given (text-encoder keys without a CLIP)


@dataclass(frozen=True)
class Problem:
    source: str
    message: str


@dataclass(frozen=True)
class Evidence:
    name: str
    file_bytes: int
    header_bytes: int
    complete: bool
    sha256: str | None
    tensor_sha256: str | None
    metadata_keys: tuple[str, ...]
    trainers: tuple[Lead, ...]
    kind: Lead
    family: Lead | None
    family_leads: tuple[Lead, ...]
    base_name: Lead | None
    base_sha256: Lead | None
    base_legacy_hash: Lead | None
    caption: CaptionCandidate | None
    caption_candidates: tuple[CaptionCandidate, ...]
    n0: Lead
    n0_subsets: dict
    resolution: Lead | None
    clip_skip: Lead | None
    prediction_type: Lead | None
    network: dict
    tensors: dict
    sshs_model_hash: Lead | None
    hints: tuple[Lead, ...]
    problems: tuple[Problem, ...]
    base_matches: tuple[BaseMatch, ...] | None = None  # None: no local checkpoints were searched
    base_fit: BaseFit | None = None

    @property
    def is_lora(self) -> bool:
        return self.kind.value in ("lora", "lycoris")

    @property
    def n0_is_default(self) -> bool:
        return self.n0.source == "default"

    def to_dict(self) -> dict:
        caption = _caption_dict(self.caption) if self.caption else {"value": None, "sources": []}
        caption.update(candidates=[_caption_dict(c) for c in self.caption_candidates],
                       fallback=None if self.caption else CAPTION_FALLBACK)
        family = _lead_dict(self.family) or {"value": None}
        family.update(name=FAMILY_NAMES.get(family["value"]), leads=[_lead_dict(lead) for lead in self.family_leads])
        return {
            "schema": SCHEMA,
            "trust": TRUST,
            "file": {"name": self.name, "bytes": self.file_bytes, "header_bytes": self.header_bytes,
                     "complete": self.complete, "sha256": self.sha256, "tensor_sha256": self.tensor_sha256,
                     "metadata_keys": len(self.metadata_keys)},
            "trainers": [_lead_dict(lead) for lead in self.trainers],
            "kind": _lead_dict(self.kind),
            "family": family,
            "base": {"name": _lead_dict(self.base_name), "sha256": _lead_dict(self.base_sha256),
                     "legacy_hash": _lead_dict(self.base_legacy_hash),
                     "local_matches": None if self.base_matches is None else [
                         {"name": m.name, "by": list(m.by), "sha256": m.sha256, "family": m.family}
                         for m in self.base_matches]},
            "caption": caption,
            "n0": {**_lead_dict(self.n0), "subsets": self.n0_subsets},
            "sampling": {"resolution": _lead_dict(self.resolution), "clip_skip": _lead_dict(self.clip_skip),
                         "prediction_type": _lead_dict(self.prediction_type)},
            "network": {k: _lead_dict(v) if isinstance(v, Lead) else v for k, v in self.network.items()},
            "tensors": self.tensors,
            "integrity": {"sshs_model_hash": _lead_dict(self.sshs_model_hash)},
            "hints": [_lead_dict(lead) for lead in self.hints],
            "problems": [{"source": p.source, "problem": p.message} for p in self.problems],
            "base_fit": None if self.base_fit is None else _base_fit_dict(self.base_fit),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=True)


def _lead_dict(lead: Lead | None) -> dict | None:
    if lead is None:
        return None
    out = {"value": lead.value, "source": lead.source}
    if lead.raw is not None:
        out["raw"] = lead.raw
    if lead.note is not None:
        out["note"] = lead.note
    return out


def _caption_dict(candidate: CaptionCandidate) -> dict:
    return {"value": candidate.text, "sources": list(candidate.sources), "priority": candidate.priority,
            "images": candidate.images, "note": candidate.note}


def _base_fit_dict(fit: BaseFit) -> dict:
    checked = fit.keys - len(fit.unchecked)
    return {"base": fit.base, "base_family": fit.base_family, "keys": fit.keys, "keys_checked": checked,
            "keys_loaded": fit.loaded, "share_loaded": round(fit.loaded / checked, 6) if checked else None,
            "layers_patched": fit.layers_patched, "not_loaded_count": len(fit.not_loaded),
            "not_loaded_examples": list(fit.not_loaded[:20]), "unchecked_count": len(fit.unchecked),
            "unchecked_examples": list(fit.unchecked[:5])}


class _Reader:
    """Derives the leads from one header, collecting problems instead of raising."""

    def __init__(self, header: Header):
        self.meta = header.metadata
        self.header = header
        self.problems = [Problem(source, message) for source, message in header.problems]
        self._parsed: dict[str, object] = {}  # each JSON value parsed once, so each problem is noted once

    def text(self, key: str) -> str | None:
        value = self.meta.get(key)
        return None if value is None or value.strip() in MISSING else value.strip()

    def json_value(self, key: str, expected: type):
        """The JSON a metadata string holds, or None (a problem is noted when it is malformed or of the wrong type)."""
        if key not in self._parsed:
            self._parsed[key] = self._parse_json(key, expected)
        return self._parsed[key]

    def _parse_json(self, key: str, expected: type):
        text = self.text(key)
        if text is None:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            self.problems.append(Problem(key, f"is not valid JSON ({error.msg} at character {error.pos}): ignored"))
            return None
        if not isinstance(value, expected):
            self.problems.append(Problem(key, f"holds a JSON {type(value).__name__}, not the {expected.__name__} its "
                                              "trainer writes: ignored"))
            return None
        return value

    # --- who wrote it -------------------------------------------------------------------------------------------
    def trainers(self) -> list[Lead]:
        found = []
        kohya_key = next((k for k in ("ss_sd_scripts_commit_hash", "ss_network_module", "ss_training_started_at")
                          if self.text(k)), None)
        implementation = self.text("modelspec.implementation_version") or ""
        if implementation.startswith("sd-scripts"):
            kohya_key = kohya_key or "modelspec.implementation_version"
        if kohya_key:
            found.append(Lead("kohya-ss/sd-scripts", kohya_key))
        software = self.json_value("software", dict)
        if software and software.get("name") == "ai-toolkit":
            found.append(Lead("ai-toolkit", "software", note=f"version {software.get('version')}"))
        if self.text("trained_words"):
            found.append(Lead("SimpleTuner", "trained_words"))
        if self.text("lora_adapter_metadata"):
            found.append(Lead("diffusers (PEFT)", "lora_adapter_metadata"))
        return found

    # --- base model family --------------------------------------------------------------------------------------
    def family_leads(self) -> tuple[list[Lead], Lead | None, str | None]:
        """(metadata leads, the tensors' lead, the adapter kind modelspec.architecture names)."""
        leads = []
        version = self.text("ss_base_model_version")
        if version is not None:
            family, _ = BASE_MODEL_VERSIONS.get(version, ("unknown", None))
            leads.append(Lead(family, "ss_base_model_version", raw=version,
                              note=None if family != "unknown" else "a value FineXtract does not know"))
        elif (self.text("ss_v2") or "").lower() == "true":
            leads.append(Lead("sd2", "ss_v2", raw=self.text("ss_v2")))
        architecture, adapter = self.text("modelspec.architecture"), None
        if architecture is not None:
            base_architecture, _, adapter = architecture.lower().partition("/")
            family = _architecture_family(base_architecture)[0]
            leads.append(Lead(family, "modelspec.architecture", raw=architecture,
                              note=None if family != "unknown" else "an architecture FineXtract does not know"))
        reading, problems = read_family(self.header.shapes)
        self.problems += [Problem("tensors", message) for message in problems]
        tensors = Lead(reading.value, "tensors", note=reading.note) if reading else None
        return leads, tensors, adapter or None

    def family(self, kind: Lead) -> tuple[Lead | None, list[Lead]]:
        metadata, tensors, adapter = self.family_leads()
        known = [lead for lead in metadata if lead.value != "unknown"]
        if len({lead.value for lead in known}) > 1:
            claims = ", ".join(f"{lead.source} = {lead.raw}" for lead in known)
            self.problems.append(Problem(", ".join(lead.source for lead in known),
                                         f"the metadata keys name different families ({claims})"))
        if tensors is not None:
            for lead in known:
                if not families_agree(tensors.value, lead.value):
                    self.problems.append(Problem(lead.source, (
                        f"claims {FAMILY_NAMES.get(lead.value, lead.value)} ({lead.raw}) but the tensors show "
                        f"{FAMILY_NAMES.get(tensors.value, tensors.value)} ({tensors.note}): the metadata is wrong or "
                        "was copied from another model. The family from the tensors is used")))
        if adapter is not None and kind.value != "unknown":
            allowed = ADAPTER_KINDS.get(adapter)
            if allowed is not None and kind.value not in allowed:
                self.problems.append(Problem("modelspec.architecture", (
                    f"says the file is a {adapter} but its tensors are those of a {kind.value} ({kind.note})")))
        elif adapter is None and self.text("modelspec.architecture") and kind.value in ("lora", "lycoris"):
            self.problems.append(Problem("modelspec.architecture", (
                f"names a full model ({self.text('modelspec.architecture')}) but the tensors are a {kind.value}")))
        chosen = tensors or next(iter(known), None)
        leads = [*metadata, *([tensors] if tensors else [])]
        return chosen, leads

    # --- base model name and hashes -----------------------------------------------------------------------------
    def base(self) -> tuple[Lead | None, Lead | None, Lead | None]:
        name = None
        for key in ("ss_sd_model_name", "ss_base_model"):
            text = self.text(key)
            if text is not None:
                # kohya records a local file's name, anything else verbatim: a hub id or a diffusers folder
                not_a_file = "/" in text and not text.lower().endswith(MODEL_EXTENSIONS)
                name = Lead(text, key, note="a Hugging Face model id or a diffusers folder" if not_a_file else None)
                break
        sha256 = legacy = None
        text = self.text("ss_new_sd_model_hash")
        if text is not None:
            if HEX64.match(text):
                sha256 = Lead(text.lower().removeprefix("0x"), "ss_new_sd_model_hash")
            else:
                self.problems.append(Problem("ss_new_sd_model_hash", f"is not a SHA-256 ({text[:80]!r}): ignored"))
        text = self.text("ss_sd_model_hash")
        if text is not None:
            if HEX8.match(text):
                legacy = Lead(text.lower(), "ss_sd_model_hash",
                              note="AUTOMATIC1111's old hash: 64 KiB of the file, a screen, not an identity")
            else:
                self.problems.append(Problem("ss_sd_model_hash", f"is not an 8-digit legacy hash ({text[:80]!r}): "
                                                                 "ignored"))
        return name, sha256, legacy

    # --- training images and caption ----------------------------------------------------------------------------
    @functools.cached_property
    def dataset_dirs(self) -> dict[str, dict]:
        """The training folders of ss_dataset_dirs that have an image count (noting those that do not, once)."""
        valid = {}
        for name, info in (self.json_value("ss_dataset_dirs", dict) or {}).items():
            count = info.get("img_count") if isinstance(info, dict) else None
            if type(count) is not int or count < 0:
                self.problems.append(Problem("ss_dataset_dirs", f"subset {name!r} has no image count (img_count = "
                                                                f"{count!r}): ignored"))
                continue
            valid[name] = info
        return valid

    def n0(self) -> tuple[Lead, dict]:
        dirs = self.dataset_dirs
        once = {name: info for name, info in dirs.items() if REPEATED_DIR.sub(r"\1", name) == name
                or REPEATED_DIR.sub(r"\1", name) not in dirs}
        subsets = {name: info["img_count"] for name, info in sorted(once.items())}
        total = sum(subsets.values())
        if total > 0:
            repeated = sorted(set(dirs) - set(once))
            note = (f"sum of img_count over {len(subsets)} training subset(s); repeats are not counted" +
                    (f"; {', '.join(repeated)} named the same folder again and counted once" if repeated else ""))
            self._check_repeats(dirs, repeated)
            return Lead(total, "ss_dataset_dirs", note=note), subsets
        datasets = self.json_value("ss_datasets", list) or []
        per_dir = {}
        for dataset in datasets:
            for subset in (dataset.get("subsets", []) if isinstance(dataset, dict) else []):
                if isinstance(subset, dict) and not subset.get("is_reg") and type(subset.get("img_count")) is int:
                    per_dir[subset.get("image_dir") or subset.get("metadata_file") or f"subset {len(per_dir)}"] = \
                        subset["img_count"]
        if sum(per_dir.values()) > 0:
            note = f"sum of img_count over {len(per_dir)} training subset folder(s)"
            return Lead(sum(per_dir.values()), "ss_datasets", note=note), dict(sorted(per_dir.items()))
        if dirs:
            self.problems.append(Problem("ss_dataset_dirs", "records 0 training images"))
        return Lead(DEFAULT_N0, "default", note=(
            f"the file records no image count: N0 = {DEFAULT_N0} is a guess (the Clique Cluster node's default); set "
            "N0 by hand if you know how many images the model was trained on")), {}

    def _check_repeats(self, dirs: dict, repeated: list[str]) -> None:
        """kohya's ss_num_train_images counts every image once per repeat: it must equal sum(img_count x n_repeats)."""
        recorded = self.text("ss_num_train_images")
        if repeated or recorded is None or not recorded.isdigit():
            return
        try:
            expected = sum(info["img_count"] * int(info["n_repeats"]) for info in dirs.values())
        except (KeyError, TypeError, ValueError):
            return
        if int(recorded) != expected:
            self.problems.append(Problem("ss_num_train_images", (
                f"is {recorded}, but ss_dataset_dirs gives {expected} (img_count x n_repeats summed): one of the two "
                "was edited, or they come from different trainings")))

    def caption_candidates(self, trainers: list[Lead]) -> list[CaptionCandidate]:
        candidates: list[CaptionCandidate] = []
        dirs = self.dataset_dirs
        regularisation = set(self.json_value("ss_reg_dataset_dirs", dict) or {})
        ai_toolkit = any(lead.value == "ai-toolkit" for lead in trainers)
        frequencies = self.json_value("ss_tag_frequency", dict) or {}
        for subset, tags in frequencies.items():
            if subset in regularisation or not isinstance(tags, dict):
                continue
            counts = {tag: count for tag, count in tags.items()
                      if isinstance(tag, str) and tag.strip() and type(count) is int and count > 0}
            if not counts:
                continue
            if ai_toolkit:  # ai-toolkit writes {"1_<trigger>": {"<trigger>": 1}}: a trigger word, not counts
                candidates += [CaptionCandidate(tag, ("ss_tag_frequency",), 3, 0, "ai-toolkit's trigger word")
                               for tag in counts]
                continue
            images = dirs.get(subset, {}).get("img_count") or max(counts.values())
            shared = [tag for tag, count in counts.items() if 2 * count >= images]  # in the captions' own order
            if not shared:
                continue
            note = f"tags in at least half of the {images} captions of subset {subset!r}"
            if len(shared) > MAX_CAPTION_TAGS:
                note += f" (the first {MAX_CAPTION_TAGS} of {len(shared)})"
                shared = shared[:MAX_CAPTION_TAGS]
            candidates.append(CaptionCandidate(", ".join(shared), ("ss_tag_frequency",), 1, images, note))
        folders = {**{name: (info.get("img_count") or 0, "ss_dataset_dirs") for name, info in dirs.items()},
                   **{name: (0, "ss_tag_frequency") for name in frequencies if name not in dirs}}
        if not ai_toolkit:
            for folder, (images, key) in folders.items():
                parsed = KOHYA_SUBSET.match(REPEATED_DIR.sub(r"\1", folder))
                if parsed and folder not in regularisation:
                    candidates.append(CaptionCandidate(parsed.group(2), (f"{key} (folder name)",), 2, images,
                                                       f"kohya's '<repeats>_<class tokens>' folder {folder!r}"))
        for dataset in self.json_value("ss_datasets", list) or []:
            for subset in (dataset.get("subsets", []) if isinstance(dataset, dict) else []):
                tokens = subset.get("class_tokens") if isinstance(subset, dict) else None
                if isinstance(tokens, str) and not subset.get("is_reg"):
                    candidates.append(CaptionCandidate(subset["class_tokens"], ("ss_datasets (class_tokens)",), 2,
                                                       subset.get("img_count") or 0, "a subset's class tokens"))
        for prompt in (self.text("trained_words") or "").split(","):
            if prompt.strip():
                candidates.append(CaptionCandidate(prompt.strip(), ("trained_words",), 2, 0,
                                                   "SimpleTuner's instance prompt"))
        trigger = self.text("modelspec.trigger_phrase")
        if trigger:
            candidates.append(CaptionCandidate(trigger, ("modelspec.trigger_phrase",), 3, 0, "the trigger phrase"))
        return _merge_candidates(candidates)

    # --- how it was trained -------------------------------------------------------------------------------------
    def resolution(self) -> Lead | None:
        leads = []
        for key in ("ss_resolution", "modelspec.resolution"):  # "(512, 512)" / "512,512" / "512"; "512x512"
            text = self.text(key)
            if text is None:
                continue
            numbers = [int(n) for n in re.findall(r"\d+", text)]
            if len(numbers) in (1, 2) and all(n > 0 for n in numbers):
                leads.append(Lead([numbers[0], numbers[-1]], key, raw=text))
            else:
                self.problems.append(Problem(key, f"is not a resolution ({text[:80]!r}): ignored"))
        if len({tuple(lead.value) for lead in leads}) > 1:
            self.problems.append(Problem(", ".join(lead.source for lead in leads), "name different resolutions ("
                                         + ", ".join(f"{lead.source} = {lead.value}" for lead in leads) + ")"))
        if not any(lead.source == "ss_resolution" for lead in leads):
            # With a dataset config kohya records each dataset's resolution there, and modelspec.resolution falls back
            # to the family's default: the datasets' come first
            datasets = self.json_value("ss_datasets", list)
            sizes = [d.get("resolution") for d in datasets or [] if isinstance(d, dict)]
            sizes = [s for s in sizes if isinstance(s, list) and len(s) == 2 and all(type(n) is int for n in s)]
            if sizes:
                leads.insert(0, Lead(sizes[0], "ss_datasets", note=None if len({tuple(s) for s in sizes}) == 1 else
                                     f"the first dataset's; the others train at {sizes[1:]}"))
        return leads[0] if leads else None

    def clip_skip(self) -> Lead | None:
        for key in ("ss_clip_skip", "modelspec.encoder_layer"):
            text = self.text(key)
            if text is None:
                continue
            if text.isdigit() and int(text) >= 1:
                return Lead(int(text), key, raw=text, note=f"in ComfyUI: CLIP Set Last Layer at -{int(text)}")
            self.problems.append(Problem(key, f"is not a clip skip ({text[:80]!r}): ignored"))
        return None

    def prediction_type(self) -> Lead | None:
        text = self.text("modelspec.prediction_type")
        if text is not None:
            value = PREDICTION_TYPES.get(text.lower())
            if value:
                return Lead(value, "modelspec.prediction_type", raw=text)
            self.problems.append(Problem("modelspec.prediction_type", f"is not a known prediction type ({text!r})"))
        version = self.text("ss_base_model_version")
        if version in BASE_MODEL_VERSIONS and BASE_MODEL_VERSIONS[version][1]:
            return Lead(BASE_MODEL_VERSIONS[version][1], "ss_base_model_version", raw=version)
        architecture = self.text("modelspec.architecture")
        implied = _architecture_family(architecture.lower().partition("/")[0])[1] if architecture else None
        return Lead(implied, "modelspec.architecture", raw=architecture) if implied else None

    def network(self, kind: Lead) -> dict:
        shapes = self.header.shapes
        network: dict = {"module": None, "dim": None, "alpha": None}
        if kind.value in ("lora", "lycoris"):
            layers = lora_layers(shapes)
            network.update(layers=len(layers), rank_in_tensors=lora_rank(shapes),
                           text_encoder_layers=sum(1 for layer in layers if is_text_encoder_key(layer)))
        for key, field_name in (("ss_network_module", "module"), ("ss_network_dim", "dim"),
                                ("ss_network_alpha", "alpha")):
            text = self.text(key)
            if text is not None:
                network[field_name] = Lead(_number_or_text(text), key, raw=text)
        peft = self.json_value("lora_adapter_metadata", dict)
        if peft:
            for suffix, field_name in (("r", "dim"), ("lora_alpha", "alpha")):
                found = sorted((k, v) for k, v in peft.items() if (k == suffix or k.endswith("." + suffix))
                               and isinstance(v, (int, float)) and math.isfinite(v))
                if found and network[field_name] is None:
                    network[field_name] = Lead(found[0][1], f"lora_adapter_metadata ({found[0][0]})")
            if network["module"] is None:
                network["module"] = Lead("peft", "lora_adapter_metadata")
        return network

    def sshs_model_hash(self, tensor_sha256: str | None) -> Lead | None:
        recorded = self.text("sshs_model_hash")
        if recorded is None:
            return None
        if tensor_sha256 is None:
            return Lead(None, "sshs_model_hash", raw=recorded, note="not checked (the file was not hashed)")
        if recorded.lower().removeprefix("0x") == tensor_sha256:
            return Lead(True, "sshs_model_hash", raw=recorded, note="matches the SHA-256 of the file's tensors")
        self.problems.append(Problem("sshs_model_hash", (
            "does not match the SHA-256 of the file's tensors: the tensors are not the ones this metadata was written "
            "with (metadata copied from another file, or tensors changed after training)")))
        return Lead(False, "sshs_model_hash", raw=recorded, note="differs from the SHA-256 of the file's tensors")

    def hints(self) -> list[Lead]:
        hints = []
        for key in HINT_KEYS:
            text = self.text(key)
            if text is not None:
                hints.append(Lead(text[:MAX_HINT_CHARS], key,
                                  note="cut short" if len(text) > MAX_HINT_CHARS else None))
        return hints


@dataclass(frozen=True)
class BaseCheck:
    """Whether the base a LoRA was trained on, as its metadata records it, is the base connected to the audit.

    The family check compares classes, config and shapes, so it cannot tell two bases of one architecture apart
    (SDXL base, Pony, Illustrious and NoobAI are all SDXL): a LoRA trained on one passes silently on another. The
    trainer's record of its base (kohya's ss_new_sd_model_hash, the SHA-256 of the base file, and ss_sd_model_name)
    can, where it was written. ``verdict``: "same" (the connected base is the recorded one), "different", or
    "unknown" (nothing recorded to compare with, or the connected base's file is not known).
    """
    verdict: str
    recorded_name: str | None
    recorded_sha256: str | None
    connected: str | None
    connected_sha256: str | None
    by: str | None  # what decided the verdict: "sha256", "name", "weights" or None
    message: str

    @property
    def warns(self) -> bool:
        return self.verdict == "different"

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "recorded_name": self.recorded_name, "recorded_sha256": self.recorded_sha256,
                "connected": self.connected, "connected_sha256": self.connected_sha256, "by": self.by,
                "message": self.message}


def recorded_base(evidence: Evidence) -> tuple[str | None, str | None, str]:
    """(name, SHA-256, both as words) of the base the file records."""
    name = str(evidence.base_name.value) if evidence.base_name else None
    sha256 = evidence.base_sha256.value if evidence.base_sha256 else None
    described = " ".join(part for part in (repr(name) if name else None,
                                           f"(SHA-256 {sha256[:12]}...)" if sha256 else None) if part)
    return name, sha256, described


def check_base_file(evidence: Evidence, connected: str, connected_sha256: str) -> BaseCheck:
    """The LoRA's recorded base against the base file connected (its name as the loader lists it, its SHA-256):
    by SHA-256 where the LoRA records one (the exact file), else by file name (a lead: files are renamed)."""
    name, sha256, described = recorded_base(evidence)
    if sha256 is None and name is None:
        return BaseCheck("unknown", None, None, connected, connected_sha256, None,
                         f"{evidence.name} records no base model, so the connected base {connected} cannot be checked "
                         "against it (two bases of one architecture pass the family check alike)")
    if sha256 is not None:
        same, by = connected_sha256 == sha256, "sha256"
    else:
        same, by = os.path.basename(connected).lower() == os.path.basename(name).lower(), "name"
    if same:
        return BaseCheck("same", name, sha256, connected, connected_sha256, by,
                         f"the connected base {connected} is the base {evidence.name} records (by {by})")
    return BaseCheck("different", name, sha256, connected, connected_sha256, by, (
        f"WARNING: {evidence.name} records its base as {described}, but the connected base is {connected}"
        f"{' (another SHA-256)' if by == 'sha256' else ''}. A LoRA audited on another base of the same architecture "
        "(SDXL base, Pony, Illustrious, NoobAI) runs without an error and extracts the wrong model's images: load the "
        "base the LoRA names as 'pretrained' and under the LoRA"))


def families_agree(first: str, second: str) -> bool:
    """Whether two family ids can be the same model family (the tensors show SDXL for SSD-1B too)."""
    return first == second or second in TENSOR_FAMILY_COVERS.get(first, ()) or first in TENSOR_FAMILY_COVERS.get(
        second, ())


def _architecture_family(base_architecture: str) -> tuple[str, str | None]:
    for prefix in sorted(ARCHITECTURE_PREFIXES, key=len, reverse=True):
        if base_architecture.startswith(prefix):
            return ARCHITECTURE_PREFIXES[prefix]
    return "unknown", None


def _number_or_text(text: str):
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        return text
    return int(number) if number.is_integer() else number


def _normalised(text: str) -> str:
    return " ".join(text.lower().replace(",", " ").split())


def _merge_candidates(candidates: list[CaptionCandidate]) -> list[CaptionCandidate]:
    """One candidate per caption text (case, commas and spacing aside), best first: lower priority number, then more
    sources agreeing, then more training images behind it."""
    merged: dict[str, CaptionCandidate] = {}
    for candidate in candidates:
        key = _normalised(candidate.text)
        if key not in merged:
            merged[key] = candidate
            continue
        seen = merged[key]
        better = candidate if candidate.priority < seen.priority else seen
        merged[key] = CaptionCandidate(better.text, tuple(dict.fromkeys(seen.sources + candidate.sources)),
                                       min(seen.priority, candidate.priority), max(seen.images, candidate.images),
                                       "; ".join(dict.fromkeys((seen.note, candidate.note))))
    return sorted(merged.values(), key=lambda c: (c.priority, -len(c.sources), -c.images, c.text))


def _tensor_summary(header: Header) -> dict:
    dtypes: dict[str, int] = {}
    parameters = 0
    for key, shape in header.shapes.items():
        dtypes[header.dtypes[key]] = dtypes.get(header.dtypes[key], 0) + 1
        count = 1
        for dimension in shape:
            count *= dimension
        parameters += count
    return {"count": len(header.shapes), "dtypes": dict(sorted(dtypes.items())), "parameters": parameters}


def read_evidence(path: str, name: str | None = None, hashes: FileHashes | None = None,
                  bases: Iterable[tuple[str, str]] | None = None) -> Evidence:
    """The evidence in the model file at ``path`` (called ``name`` in the output, its file name by default).

    ``hashes``: hash the file (its SHA-256 and the tensors' SHA-256 that checks kohya's sshs_model_hash), with that
    cache; None reads the header alone. ``bases``: (name, path) of the checkpoints to match the recorded base against.
    Raises EvidenceError when the file is no readable safetensors file; any other problem is reported in the result.
    """
    header = read_header(path)
    reader = _Reader(header)
    digests = hashes.digests(path) if hashes is not None else None
    trainers = reader.trainers()
    kind_reading = read_kind(header.shapes)
    kind = Lead(kind_reading.value, kind_reading.source, note=kind_reading.note)
    family, family_leads = reader.family(kind)
    base_name, base_sha256, base_legacy = reader.base()
    candidates = reader.caption_candidates(trainers)
    n0, n0_subsets = reader.n0()
    resolution, clip_skip, prediction_type = reader.resolution(), reader.clip_skip(), reader.prediction_type()
    network = reader.network(kind)
    sshs_model_hash = reader.sshs_model_hash(digests.tensor_sha256 if digests else None)
    hints = reader.hints()
    evidence = Evidence(
        name=name or os.path.basename(path), file_bytes=header.file_bytes, header_bytes=header.header_bytes,
        complete=header.complete, sha256=digests.sha256 if digests else None,
        tensor_sha256=digests.tensor_sha256 if digests else None, metadata_keys=tuple(sorted(header.metadata)),
        trainers=tuple(trainers), kind=kind, family=family, family_leads=tuple(family_leads), base_name=base_name,
        base_sha256=base_sha256, base_legacy_hash=base_legacy, caption=candidates[0] if candidates else None,
        caption_candidates=tuple(candidates), n0=n0, n0_subsets=n0_subsets, resolution=resolution,
        clip_skip=clip_skip, prediction_type=prediction_type, network=network, tensors=_tensor_summary(header),
        sshs_model_hash=sshs_model_hash, hints=tuple(hints), problems=tuple(reader.problems),
    )
    if bases is not None:
        evidence = replace(evidence, base_matches=match_bases(evidence, bases, hashes))
    return evidence


def _family_of_file(path: str) -> str | None:
    try:
        reading, _ = read_family(read_header(path).shapes)
    except EvidenceError:
        return None
    return reading.value if reading else None


def match_bases(evidence: Evidence, candidates: Iterable[tuple[str, str]], hashes: FileHashes | None
                ) -> tuple[BaseMatch, ...]:
    """The candidates (name, path) that the file's base record points to: by SHA-256 (the exact file), by the legacy
    hash, by name. Full hashes are computed only for candidates worth it: those whose 64 KiB legacy hash matches
    when one is recorded, else those of the file's family (hashing every checkpoint of a large folder once; the cache
    keeps it at once)."""
    recorded_name = evidence.base_name.value if evidence.base_name else None
    recorded_stem = os.path.splitext(os.path.basename(recorded_name))[0].lower() if recorded_name else None
    sha256 = evidence.base_sha256.value if evidence.base_sha256 else None
    legacy = evidence.base_legacy_hash.value if evidence.base_legacy_hash else None
    family = evidence.family.value if evidence.family else None
    matches = []
    for name, path in candidates:
        by = []
        if recorded_name and os.path.basename(name).lower() == os.path.basename(recorded_name).lower():
            by.append("name")
        elif recorded_stem and os.path.splitext(os.path.basename(name))[0].lower() == recorded_stem:
            by.append("file stem")
        candidate_family = _family_of_file(path)
        digest = None
        if hashes is not None and (sha256 or legacy):
            legacy_matches = legacy is not None and hashes.legacy(path) == legacy
            same_family = family is None or candidate_family in (family, None)
            worth_hashing = sha256 and (legacy_matches or by or (legacy is None and same_family))
            if worth_hashing:
                digest = hashes.sha256(path)
            if sha256 and digest == sha256:
                by.insert(0, "sha256")
            elif legacy_matches and not sha256:
                by.insert(0, "legacy hash")
        if by:
            matches.append(BaseMatch(name, tuple(by), digest, candidate_family))
    return tuple(sorted(matches, key=lambda m: ("sha256" not in m.by, "legacy hash" not in m.by, m.name)))


def model_files_under(folder: str) -> list[tuple[str, str]]:
    """(name relative to ``folder``, path) of every model file below it, sorted: the --bases candidates."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for file in sorted(files):
            if file.lower().endswith(MODEL_EXTENSIONS):
                path = os.path.join(root, file)
                found.append((os.path.relpath(path, folder).replace(os.sep, "/"), path))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finextract_core.evidence",
        description="Print the evidence each model file carries (one JSON object per file, one per line): kind, base "
                    "model family, base name and hash, a proposed training caption, N0, resolution, clip skip and "
                    "prediction type, each with the header key it came from. Reads the safetensors header only; "
                    "metadata is a lead, never proof.")
    parser.add_argument("files", nargs="+", metavar="FILE", help="safetensors model files (LoRA, checkpoint, UNet)")
    parser.add_argument("--bases", action="append", default=[], metavar="DIR",
                        help="a folder of base checkpoints to match each file's recorded base against (by SHA-256, "
                             "legacy hash and name); may be given more than once")
    parser.add_argument("--no-hash", action="store_true",
                        help="do not hash files: no file SHA-256, no sshs_model_hash check, bases matched by name only")
    parser.add_argument("--hash-cache", default=None, metavar="FILE",
                        help=f"the hash cache (default: $FINEXTRACT_HASH_CACHE or {default_cache_file()})")
    args = parser.parse_args(argv)
    hashes = None if args.no_hash else FileHashes(args.hash_cache or default_cache_file())
    bases = None
    if args.bases:
        for folder in args.bases:
            if not os.path.isdir(folder):
                parser.error(f"--bases {folder}: not a folder")
        bases = [candidate for folder in args.bases for candidate in model_files_under(folder)]
    failed = 0
    for path in args.files:
        try:
            line = read_evidence(path, name=path, hashes=hashes, bases=bases).to_json()
        except EvidenceError as error:
            failed += 1
            line = json.dumps({"schema": SCHEMA, "file": {"name": path}, "error": str(error)}, sort_keys=True)
        print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
