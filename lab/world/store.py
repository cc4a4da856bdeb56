"""A world on disk: its spec (JSON), pretrained weights and fine-tunes (safetensors), built once and reused.

Layout of a world folder::

    world.json                  spec (everything that determines the weights) + how the build went
    pretrained.safetensors      "unet.*" and "text_encoder.*"
    finetunes/<name>.safetensors  a DreamBooth-style UNet state dict, or a kohya-format LoRA

A folder is reused only when its world.json holds exactly the requested spec; the same spec and seed always give
the same weights, so a cached world is the world the spec describes.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .text import TextConfig, TextEncoder
from .schedule import Schedule
from .training import LOG, FineTuneSettings, PretrainSettings, fine_tune, pretrain
from .data import images_digest
from .unet import UNetConfig, WorldUNet

# 2: the UNet adds the schedule's skip term; 3: training threads are part of the spec; 4: self- and cross-attention
# at 32x32 (no folding to 16x16), textured pretraining data with 6-word captions
FORMAT_VERSION = 4
SPEC_FILE = "world.json"
WEIGHTS_FILE = "pretrained.safetensors"


@dataclass(frozen=True)
class WorldSpec:
    seed: int = 0
    unet: UNetConfig = field(default_factory=UNetConfig)
    text: TextConfig = field(default_factory=TextConfig)
    schedule: Schedule = field(default_factory=Schedule)
    pretraining: PretrainSettings = field(default_factory=PretrainSettings)

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "WorldSpec":
        if values.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"world format {values.get('format_version')} is not {FORMAT_VERSION}: rebuild the world")
        return cls(seed=values["seed"], unet=UNetConfig.from_dict(values["unet"]), text=TextConfig(**values["text"]),
                   schedule=Schedule(**values["schedule"]), pretraining=PretrainSettings(**values["pretraining"]))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class World:
    folder: str
    spec: WorldSpec
    unet: WorldUNet
    text_encoder: TextEncoder

    def fine_tune_path(self, name: str) -> str:
        return os.path.join(self.folder, "finetunes", f"{name}.safetensors")


def new_modules(spec: WorldSpec) -> tuple[WorldUNet, TextEncoder]:
    """Freshly initialised modules; their initial weights depend only on ``spec.seed``."""
    torch.manual_seed(spec.seed)
    return WorldUNet(spec.unet, spec.schedule), TextEncoder(spec.text)


def build_or_load(folder: str, spec: WorldSpec) -> World:
    """The world in ``folder``: loaded if it was built with ``spec``, otherwise pretrained now and saved there."""
    spec_path = os.path.join(folder, SPEC_FILE)
    if os.path.exists(spec_path):
        with open(spec_path) as handle:
            stored = json.load(handle)
        if stored.get("spec") == json.loads(json.dumps(spec.to_dict())):
            return load(folder)
        raise ValueError(f"{folder} holds a different world (spec {stored.get('spec')}); choose another folder")
    unet, text_encoder = new_modules(spec)
    LOG.info(f"building the world in {folder} ({spec.pretraining.steps} pretraining steps)")
    stats = pretrain(unet, text_encoder, spec.pretraining, spec.schedule, spec.seed)
    os.makedirs(folder, exist_ok=True)
    weights = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    weights.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(folder, WEIGHTS_FILE))
    with open(spec_path, "w") as handle:  # written last: a folder with world.json is complete
        json.dump({"spec": spec.to_dict(), "pretraining_result": stats}, handle, indent=2)
    return World(folder, spec, unet, text_encoder)


def load(folder: str) -> World:
    with open(os.path.join(folder, SPEC_FILE)) as handle:
        spec = WorldSpec.from_dict(json.load(handle)["spec"])
    unet, text_encoder = new_modules(spec)
    weights = load_file(os.path.join(folder, WEIGHTS_FILE))
    unet.load_state_dict(_with_prefix(weights, "unet."))
    text_encoder.load_state_dict(_with_prefix(weights, "text_encoder."))
    return World(folder, spec, unet.eval(), text_encoder.eval())


def _with_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def fine_tune_name(images: np.ndarray, caption: str, settings: FineTuneSettings, seed: int) -> str:
    """A file name that changes with anything that changes the fine-tune's weights."""
    key = json.dumps([caption, asdict(settings), seed, images_digest(images)], sort_keys=True)
    return f"{settings.style}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


FINE_TUNE_METADATA_KEY = "finextract_fine_tune"


def fine_tune_record(path: str) -> dict:
    """What a fine-tune file says about itself: caption, style, settings, world digest and its training record (steps
    run, memorisation)."""
    with safe_open(path, "pt") as handle:
        return json.loads((handle.metadata() or {})[FINE_TUNE_METADATA_KEY])


def build_or_load_fine_tune(world: World, images: np.ndarray, caption: str, settings: FineTuneSettings,
                            seed: int) -> str:
    """The path of the fine-tune of ``world`` on ``images`` (N0, 3, 32, 32) with ``caption``, trained if missing."""
    path = world.fine_tune_path(fine_tune_name(images, caption, settings, seed))
    if not os.path.exists(path):
        LOG.info(f"fine-tuning {settings.style} ({settings.steps} steps, lr {settings.lr:g}) on {len(images)} images "
                 f"captioned {caption!r}")
        record = {}
        weights = fine_tune(world.unet, world.text_encoder, torch.from_numpy(images), caption, settings,
                            world.spec.schedule, seed, record=record)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        described = {"caption": caption, "style": settings.style, "settings": asdict(settings),
                     "world": world.spec.digest(), "record": record}
        # One metadata key: safetensors writes several in hash-map order, so equal fine-tunes got different bytes.
        metadata = {FINE_TUNE_METADATA_KEY: json.dumps(described, sort_keys=True)}
        save_file({k: v.contiguous() for k, v in weights.items()}, path + ".tmp", metadata=metadata)
        os.replace(path + ".tmp", path)  # never leave a half-written fine-tune under the cached name
    return path
