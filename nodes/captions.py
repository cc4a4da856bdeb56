"""CaptionInverter: read a fine-tune's training caption from its cross-attention weights (the paper's Appendix A).

ComfyUI's side of it: the fine-tuned and pretrained attn2 to_k / to_v weights exactly as ComfyUI applies them (a
LoRA's patches included), and the CLIP text encoder(s) of the CLIP input rebuilt as functional encoders at the layer
the CLIP object itself encodes with (its clip-skip setting included), so the search can differentiate through them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

import comfy.clip_model
import comfy.lora
import comfy.model_management
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.utils
from comfy_api.latest import io

from ..finextract_core.caption_inversion import (
    CROSS_ATTENTION_TEXT_PROJECTIONS,
    KEPT_CANDIDATES,
    PromptCandidate,
    gather_cross_attention_projections,
    invert_caption,
)
from ..finextract_core.clip_text import FunctionalClipText, text_encoder_access
from .guider import check_same_family

CATEGORY = "FineXtract/caption"
VOCABULARIES = {
    "whole words": "lower-case whole words of the CLIP vocabulary (about 33,000 of 49,408 tokens): readable captions",
    "all tokens": "every CLIP token, word pieces and punctuation included: may score higher, reads worse",
}
SINGLE_TOKEN_RANKINGS = {
    "search candidates": "rank the tokens that appear in the search's candidate captions (a few dozen)",
    "whole vocabulary": "rank every token the search may use (one encoding each: about 33,000 for whole words)",
}
WHOLE_WORD = re.compile(r"[a-z]+</w>")


def effective_weights(patcher, prefix: str, keep: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    """The weights under ``prefix`` as ComfyUI applies them: the unpatched weight plus the patcher's patches (a LoRA).

    Reads through ``get_key_patches``, which gives the original weight even while another clone's patches sit in the
    shared module, and only computes the kept keys. Keys are returned without the prefix.
    """
    weights = {}
    for key, ((weight, convert), *patches) in patcher.get_key_patches(prefix).items():
        if not keep(key):
            continue
        if patches:
            weight = comfy.lora.calculate_weight(patches, convert(weight.to(torch.float32, copy=True), inplace=True), key)
        weights[key[len(prefix):]] = weight
    return weights


def _is_text_projection(key: str) -> bool:
    return key.endswith(CROSS_ATTENTION_TEXT_PROJECTIONS)


def _check_pair(fine_tuned, pretrained) -> None:
    if fine_tuned is pretrained:
        raise ValueError("The same MODEL is connected to 'fine_tuned' and 'pretrained': connect the fine-tuned checkpoint "
                         "(or the base model through LoraLoaderModelOnly) to 'fine_tuned' and its base model to "
                         "'pretrained'.")
    check_same_family(fine_tuned, pretrained)


def _text_encoder_parts(clip) -> list[str]:
    """Attribute names of the CLIP's text encoders, in the order their outputs are concatenated into the context."""
    model = clip.cond_stage_model
    if isinstance(model, comfy.sdxl_clip.SDXLClipModel):
        names = ["clip_l", "clip_g"]  # SDXLClipModel.encode_token_weights: cat([clip_l, clip_g], dim=-1)
    elif isinstance(model, comfy.sd1_clip.SD1ClipModel):
        names = [model.clip]
    else:
        names = []
    if not names or not all(
        isinstance(getattr(model, name), comfy.sd1_clip.SDClipModel)
        and isinstance(getattr(model, name).transformer, comfy.clip_model.CLIPTextModel)
        for name in names
    ):
        raise ValueError(f"This CLIP ({type(model).__name__}) is not a CLIP text encoder of SD 1.x / SD 2.x / SDXL; "
                         "caption inversion needs the CLIP loaded with one of those checkpoints.")
    return names


def functional_text_encoders(clip, device) -> list[FunctionalClipText]:
    """The CLIP's encoders at the hidden layer and normalisation that ``clip.encode_from_tokens`` would use now."""
    model = clip.cond_stage_model
    names = _text_encoder_parts(clip)
    # As CLIP.encode_from_tokens does: defaults, then the clip-skip layer of this CLIP object (CLIPSetLastLayer).
    model.reset_clip_options()
    if clip.layer_idx is not None:
        model.set_clip_options({"layer": clip.layer_idx})
    try:
        settings = []
        for name in names:
            part = getattr(model, name)
            if part.layer == "last":
                settings.append((name, part, -1, True))
            elif part.layer == "hidden":
                settings.append((name, part, part.layer_idx, part.layer_norm_hidden_state))
            else:
                raise ValueError(f"The CLIP's {name} returns layer setting {part.layer!r}; caption inversion supports "
                                 "the last layer or one hidden layer (clip skip).")
    finally:
        model.reset_clip_options()
    encoders = []
    for name, part, output_layer, final_norm in settings:
        first_layer = part.transformer.text_model.encoder.layers[0]
        activation = next(key for key, function in comfy.clip_model.ACTIVATIONS.items()
                          if function is first_layer.mlp.activation)
        weights = effective_weights(clip.patcher, f"{name}.transformer.")
        encoders.append(FunctionalClipText(weights, heads=first_layer.self_attn.heads, activation=activation,
                                           output_layer=output_layer, final_layer_norm=final_norm, device=device))
    return encoders


def _token_texts(clip) -> dict[int, str]:
    """Token id -> BPE text ("word</w>") of the CLIP's tokenizer; SDXL's two tokenizers share this vocabulary."""
    return getattr(clip.tokenizer, _text_encoder_parts(clip)[0]).inv_vocab


def caption_text(token_ids, token_texts: dict[int, str]) -> str:
    return "".join(token_texts[i] for i in token_ids).replace("</w>", " ").strip()


def _words(text: str) -> list[str]:
    return [word for word in re.split(r"[\s,]+", text.lower()) if word]


def _candidate_vocabulary(token_texts: dict[int, str], vocabulary: str, search_words: str, excluded_words: str,
                          special: set[int]):
    """Token ids the search may use: the listed words if any, else the vocabulary option; minus the excluded words."""
    excluded = set(_words(excluded_words))
    listed = set(_words(search_words))
    if listed:
        known = {text.removesuffix("</w>") for text in token_texts.values() if text.endswith("</w>")}
        unknown = sorted(listed - known)
        if unknown:
            raise ValueError(f"These search words are not single tokens of the CLIP vocabulary: {', '.join(unknown[:10])}"
                             f"{' ...' if len(unknown) > 10 else ''}. Remove them (or split them into words that are).")
    ids = [
        i for i, text in sorted(token_texts.items())
        if i not in special and text.removesuffix("</w>") not in excluded
        and (text.endswith("</w>") and text.removesuffix("</w>") in listed if listed
             else vocabulary == "all tokens" or WHOLE_WORD.fullmatch(text))
    ]
    if not ids:
        raise ValueError("No token is left to search over: exclude fewer words.")
    return torch.tensor(ids)


def _ranked_lines(candidates: Sequence[PromptCandidate], token_texts: dict[int, str]) -> str:
    return "\n".join(f"{c.score:.5f}\t{caption_text(c.token_ids, token_texts)}" for c in candidates)


def recover_caption(fine_tuned, pretrained, clip, max_words: int, iterations: int, restarts: int, seed: int,
                    vocabulary: str, single_token_ranking: str, search_words: str, excluded_words: str,
                    on_step=None):
    """Returns (best caption, ranked captions, ranked single tokens) as text; see the node for the inputs."""
    _check_pair(fine_tuned, pretrained)
    projections = gather_cross_attention_projections(
        effective_weights(pretrained, "diffusion_model.", _is_text_projection),
        effective_weights(fine_tuned, "diffusion_model.", _is_text_projection),
    )
    device = comfy.model_management.get_torch_device()
    encoders = functional_text_encoders(clip, device)
    clip_width = sum(encoder.width for encoder in encoders)
    if clip_width != projections.text_dim:
        widths = " + ".join(str(encoder.width) for encoder in encoders)
        widths += f" = {clip_width}" if len(encoders) > 1 else ""
        raise ValueError(f"The CLIP's text embeddings are {widths} wide but the model's cross-attention "
                         f"reads {projections.text_dim}-wide ones: connect the CLIP of the same family as the model "
                         "(SD 1.x: CLIP-L, 768; SD 2.x: OpenCLIP-H, 1024; SDXL: CLIP-L + bigG, 2048).")
    special_tokens = getattr(clip.cond_stage_model, _text_encoder_parts(clip)[0]).special_tokens
    access = text_encoder_access(encoders, special_tokens["start"], special_tokens["end"])
    token_texts = _token_texts(clip)
    allowed = _candidate_vocabulary(token_texts, vocabulary, search_words, excluded_words,
                                    {access.start_token_id, access.end_token_id})
    inversion = invert_caption(projections, access, prompt_tokens=max_words, iterations=iterations, restarts=restarts,
                               seed=seed, candidate_token_ids=allowed,
                               ranked_token_ids=allowed if single_token_ranking == "whole vocabulary" else None,
                               on_step=on_step)
    search = inversion.search
    return (caption_text(search.best.token_ids, token_texts), _ranked_lines(search.candidates, token_texts),
            _ranked_lines(inversion.single_tokens, token_texts))


class CaptionInverter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FineXtractCaptionInverter",
            display_name="Caption Inverter (FineXtract)",
            category=CATEGORY,
            description="Recovers words of a fine-tune's unpublished training caption from the weights alone (Appendix "
                        "A of the paper): scores prompts by how much the fine-tune changed the cross-attention "
                        "key/value projections that read them, and searches hard prompts that maximise it. Recovers "
                        "words (an identifier such as 'sks', a subject), not the exact caption. Feed the caption to "
                        "CLIPTextEncode for the guidance nodes.",
            inputs=[
                io.Model.Input("pretrained", tooltip="The base model the fine-tune was trained from."),
                io.Model.Input("fine_tuned", tooltip="The fine-tuned model: a DreamBooth checkpoint, or the base model "
                               "through LoraLoaderModelOnly for a LoRA. Only the cross-attention to_k / to_v weights "
                               "are read."),
                io.Clip.Input("clip", tooltip="The text encoder the model uses (the checkpoint's CLIP; a LoRA's text "
                              "encoder patches and CLIPSetLastLayer are honoured). SD 1.x: CLIP-L. SDXL: CLIP-L and "
                              "OpenCLIP bigG together, one token id driving both (a CPU search is far slower)."),
                io.Int.Input("max_words", default=3, min=1, max=20, tooltip="Tokens in the searched caption (the "
                             "paper: 3 and 7). Short captions recover the rare identifier more reliably."),
                io.Int.Input("iterations", default=1000, min=0, max=100000, tooltip="Projected-gradient steps (the "
                             "paper: 1000). Every step encodes the current caption of every restart through the text "
                             "encoder once, forward and backward: the time grows with iterations x restarts."),
                io.Int.Input("restarts", default=4, min=1, max=256, tooltip="Random starting prompts, searched "
                             "together as one batch; the best prompt over all of them is kept."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds the starting prompts and the reference prompts: same inputs and seed give "
                             "the same caption."),
                io.Combo.Input("vocabulary", options=list(VOCABULARIES), default="whole words",
                               tooltip=" ".join(f"{name}: {text}." for name, text in VOCABULARIES.items())),
                io.Combo.Input("single_token_ranking", options=list(SINGLE_TOKEN_RANKINGS),
                               default="search candidates",
                               tooltip=" ".join(f"{name}: {text}." for name, text in SINGLE_TOKEN_RANKINGS.items())),
                io.String.Input("search_words", default="", multiline=True, tooltip="Optional: search only these "
                                "words (separated by commas, spaces or lines; each a single token of the CLIP "
                                "vocabulary), for example a list of suspected identifiers and subjects. Empty: the "
                                "whole vocabulary option. A short list is searched far faster and more reliably."),
                io.String.Input("excluded_words", default="", multiline=False, tooltip="Words never to use, separated "
                                "by commas or spaces (for example words the search keeps returning that you know "
                                "are not in the caption)."),
            ],
            outputs=[
                io.String.Output(display_name="caption", tooltip="The best caption found: connect it to "
                                 "CLIPTextEncode."),
                io.String.Output(display_name="ranked_captions", tooltip=f"Up to {KEPT_CANDIDATES} captions met "
                                 "during the search, best first, one per line: score, tab, caption."),
                io.String.Output(display_name="ranked_tokens", tooltip=f"Up to {KEPT_CANDIDATES} single tokens, best "
                                 "first, one per line: score, tab, token. A rare token at the top is likely the "
                                 "identifier."),
            ],
        )

    @classmethod
    def execute(cls, pretrained, fine_tuned, clip, max_words, iterations, restarts, seed, vocabulary,
                single_token_ranking, search_words, excluded_words) -> io.NodeOutput:
        progress = comfy.utils.ProgressBar(iterations)

        def on_step(step: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(step)

        # ComfyUI runs nodes under inference mode; the search needs gradients through the text encoder.
        with torch.inference_mode(False), torch.enable_grad():
            caption, captions, tokens = recover_caption(
                fine_tuned, pretrained, clip, max_words, iterations, restarts, seed, vocabulary, single_token_ranking,
                search_words, excluded_words, on_step)
        shown = f"{caption}\n\ncaptions:\n{captions}\n\nsingle tokens:\n{tokens}"
        return io.NodeOutput(caption, captions, tokens, ui={"text": [shown]})


NODES = [CaptionInverter]
