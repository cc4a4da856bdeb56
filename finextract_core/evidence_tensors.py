"""What a model file is, from its tensors' names and shapes alone (as its header lists them).

Names and shapes cannot be edited the way metadata can without breaking the model for every loader, so they are the
check on what the metadata claims. Read here:

- the kind of file: a LoRA (kohya ``lora_up`` / ``lora_down``, PEFT ``lora_A`` / ``lora_B``, diffusers attention
  processors ``to_k_lora.up``), a LyCORIS (LoHa ``hada_*``, LoKr ``lokr_*``, OFT), a full checkpoint
  (``model.diffusion_model.*`` with its text encoder and VAE), a diffusion model alone (UNet/DiT, what ComfyUI's
  UNETLoader reads), or a textual-inversion embedding;
- the family: Flux from ``double_blocks`` / ``single_blocks`` (``single_transformer_blocks`` in diffusers names),
  SD 3 from ``joint_blocks``, SDXL from its second text encoder (``lora_te2_*``, ``text_encoder_2.``,
  ``conditioner.embedders.1``), and the UNet families from the width of the text context that cross-attention reads
  (the input width of ``attn2.to_k`` and ``attn2.to_v``): 768 for SD 1.x (CLIP ViT-L), 1024 for SD 2.x (OpenCLIP
  ViT-H), 2048 for SDXL (CLIP-L and bigG side by side), 1280 for the SDXL refiner (bigG alone).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

# Suffixes of the tensors a LoRA-type file stores per layer, as ComfyUI's weight adapters read them.
LORA_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".lora_A.weight", ".lora_B.weight",
                 ".lora_A.default.weight", ".lora_B.default.weight", "_lora.up.weight", "_lora.down.weight",
                 ".lora.up.weight", ".lora.down.weight", ".lora_linear_layer.up.weight",
                 ".lora_linear_layer.down.weight")
LYCORIS_SUFFIXES = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2", ".lokr_w1",
                    ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2", ".oft_blocks",
                    ".oft_R", ".diff", ".diff_b", ".w_norm", ".b_norm", ".set_weight")
SIDE_SUFFIXES = (".alpha", ".dora_scale", ".reshape_weight", ".scale")  # per-layer extras, never a layer alone
# A LoRA's down (A) halves: rank x input width.
LORA_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight", "_lora.down.weight",
                      ".lora.down.weight", ".lora_linear_layer.down.weight")
# Matrices whose second dimension is the layer's input width: the down halves and LoHa's right factors.
INPUT_SIDE_SUFFIXES = LORA_DOWN_SUFFIXES + (".hada_w1_b", ".hada_w2_b")
# Text-encoder LoRA keys, as ComfyUI's model_lora_keys_clip names them (kohya, OneTrainer, diffusers).
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_prior_te_", "text_encoder.",
                         "text_encoder_2.", "text_encoders.")

SECOND_TEXT_ENCODER_PREFIXES = ("lora_te2_", "text_encoder_2.", "conditioner.embedders.1.")  # SDXL's CLIP-bigG
CONTEXT_WIDTH_FAMILIES = {768: "sd1", 1024: "sd2", 1280: "sdxl-refiner", 2048: "sdxl"}
CROSS_ATTENTION_KEY = re.compile(r"attn2[._](processor[._])?to_[kv]")  # k and v read the text context


@dataclass(frozen=True)
class TensorReading:
    """A finding from the tensors, with the tensor that shows it (its name and shape) as the source."""
    value: str
    source: str
    note: str


def _layer_name(key: str) -> str | None:
    for suffix in LORA_SUFFIXES + LYCORIS_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def lora_layers(keys) -> dict[str, list[str]]:
    """The layers a LoRA-type file patches: layer name -> its tensors (side tensors such as alpha included)."""
    layers: dict[str, list[str]] = {}
    for key in keys:
        layer = _layer_name(key)
        if layer is not None:
            layers.setdefault(layer, []).append(key)
    for key in keys:
        for suffix in SIDE_SUFFIXES:
            if key.endswith(suffix) and key[: -len(suffix)] in layers:
                layers[key[: -len(suffix)]].append(key)
    return layers


def is_text_encoder_key(key: str) -> bool:
    """A LoRA key for a text encoder rather than the denoiser (by the prefixes trainers and ComfyUI use)."""
    return key.startswith(TEXT_ENCODER_PREFIXES)


def _describe(key: str, shapes: dict) -> str:
    return f"{key} {list(shapes[key])}"


def read_kind(shapes: dict[str, tuple[int, ...]]) -> TensorReading:
    keys = sorted(shapes)
    lycoris = [k for k in keys if k.endswith(LYCORIS_SUFFIXES)]
    lora = [k for k in keys if k.endswith(LORA_SUFFIXES)]
    if lycoris:
        return TensorReading("lycoris", "tensors", f"LyCORIS layers ({lycoris[0]}, ...): {len(lora_layers(keys))} "
                                                   "patched layers")
    if lora:
        style = ("kohya (lora_up / lora_down)" if any(k.endswith(".lora_down.weight") for k in lora) else
                 "PEFT (lora_A / lora_B)" if any(".lora_A." in k for k in lora) else "diffusers attention processors")
        return TensorReading("lora", "tensors", f"LoRA in {style} naming ({lora[0]}, ...): "
                                                f"{len(lora_layers(keys))} patched layers")
    if any(k.startswith("model.diffusion_model.") for k in keys):
        parts = [name for name, prefixes in (("text encoder", ("cond_stage_model.", "conditioner.", "text_encoders.")),
                                             ("VAE", ("first_stage_model.", "vae.")))
                 if any(k.startswith(prefixes) for k in keys)]
        return TensorReading("checkpoint", "tensors", "full checkpoint: model.diffusion_model.*" +
                             "".join(f" + {part}" for part in parts))
    denoiser = ("input_blocks.", "middle_block.", "output_blocks.", "double_blocks.", "single_blocks.",
                "joint_blocks.", "down_blocks.", "up_blocks.", "transformer_blocks.", "diffusion_model.")
    if any(k.startswith(denoiser) for k in keys):
        return TensorReading("unet", "tensors", "a diffusion model alone (UNet/DiT weights, what UNETLoader reads)")
    if set(keys) in ({"emb_params"}, {"clip_l", "clip_g"}):
        return TensorReading("embedding", "tensors", "a textual-inversion embedding")
    return TensorReading("unknown", "tensors", f"{len(keys)} tensors in no layout FineXtract knows"
                                               + (f" (first: {keys[0]})" if keys else ""))


def read_family(shapes: dict[str, tuple[int, ...]]) -> tuple[TensorReading | None, list[str]]:
    """The family the tensors show (None when they show none) and the contradictions among the tensors themselves."""
    keys = sorted(shapes)
    for family, markers in (("flux", ("double_blocks", "single_blocks", "single_transformer_blocks")),
                            ("sd3", ("joint_blocks",))):
        marked = next((k for k in keys if any(m in k for m in markers)), None)
        if marked:
            return TensorReading(family, "tensors", f"{family} block names ({marked})"), []
    widths: dict[int, list[str]] = {}  # context width -> the cross-attention tensors that read it
    for key in keys:
        shape = shapes[key]
        reads_context = key.endswith((*INPUT_SIDE_SUFFIXES, "to_k.weight", "to_v.weight"))
        if CROSS_ATTENTION_KEY.search(key) and len(shape) >= 2 and reads_context:
            widths.setdefault(shape[1], []).append(key)
    second_encoder = next((k for k in keys if k.startswith(SECOND_TEXT_ENCODER_PREFIXES)), None)
    problems = []
    if len(widths) > 1:
        problems.append("cross-attention layers read text contexts of different widths ("
                        + ", ".join(f"{w} in {len(k)} tensor(s) such as {k[0]}" for w, k in sorted(widths.items()))
                        + "): a merge of two families? The width most layers read is used")
    if widths:
        width, tensors = min(widths.items(), key=lambda item: (-len(item[1]), item[0]))
        key = tensors[0]
        family = CONTEXT_WIDTH_FAMILIES.get(width)
        if family is None:
            return None, problems + [f"cross-attention reads a text context {width} wide ({_describe(key, shapes)}), "
                                     "a width no known family uses"]
        if second_encoder and family != "sdxl":
            problems.append(f"a second text encoder ({second_encoder}) but a cross-attention width of {width}")
        return TensorReading(family, "tensors", f"cross-attention input width {width} ({_describe(key, shapes)})"), \
            problems
    if second_encoder:
        return TensorReading("sdxl", "tensors", f"a second text encoder ({second_encoder})"), problems
    text_width = next(((shapes[k][1], k) for k in keys if k.startswith("lora_te_") and "self_attn_q_proj" in k
                       and k.endswith(INPUT_SIDE_SUFFIXES) and len(shapes[k]) == 2), None)
    if text_width and text_width[0] in (768, 1024):
        family = {768: "sd1", 1024: "sd2"}[text_width[0]]
        return TensorReading(family, "tensors", f"a text-encoder-only LoRA on a text encoder {text_width[0]} wide "
                                                f"({_describe(text_width[1], shapes)})"), problems
    return None, problems


def lora_rank(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The most common rank of the LoRA's down (A) matrices: what ``network_dim`` / ``r`` was at training."""
    ranks = Counter(shape[0] for key, shape in shapes.items()
                    if key.endswith(LORA_DOWN_SUFFIXES) and len(shape) >= 2)
    return min(ranks, key=lambda rank: (-ranks[rank], rank)) if ranks else None
