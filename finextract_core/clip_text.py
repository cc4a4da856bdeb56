"""A CLIP text transformer written as plain functions of its weights, so gradients can flow through it.

Caption inversion differentiates the score of a prompt with respect to the prompt's input token embeddings. The
text encoders of diffusion pipelines (ComfyUI's, transformers') add residuals in place and often run under
inference mode, so autograd cannot go through them. This module recomputes the same forward pass from the same
weights without touching any tensor in place: token embeddings + position embeddings, pre-norm layers (layer_norm1,
causal multi-head self-attention with q/k/v/out_proj, layer_norm2, mlp fc1 -> activation -> fc2), and optionally
final_layer_norm.

It reads a CLIP text state dict with the key names ComfyUI and transformers share (``text_model.embeddings...``,
``text_model.encoder.layers.N...``, ``text_model.final_layer_norm...``; a leading prefix before ``text_model.`` is
ignored). Which hidden state is returned is the caller's choice, because pipelines differ: SD 1.x reads the last
layer after final_layer_norm (or, with clip skip, an earlier layer, normalised or not); SDXL reads the penultimate
layer of CLIP-L and of OpenCLIP bigG without the final norm. Only the layers up to the one returned are run.

The attention is causal, so the first ``n`` rows of a sequence do not depend on what follows them: encoding ``n``
positions gives exactly the first ``n`` rows of an encoding padded to the full context length.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .caption_inversion import TextEncoderAccess

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP (CLIP-L)
    "gelu": F.gelu,  # OpenCLIP (ViT-H, bigG)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
LAYER_NORM_EPS = 1e-5  # CLIP's and OpenCLIP's layer_norm_eps

_LAYER_KEYS = (
    "layer_norm1.weight", "layer_norm1.bias", "layer_norm2.weight", "layer_norm2.bias",
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)  # fmt: skip


def _strip_to_text_model(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``text_model.*`` entries, keyed from ``text_model.`` on whatever prefix the caller's dict uses."""
    stripped = {}
    for key, value in state_dict.items():
        position = key.find("text_model.")
        if position >= 0:
            stripped[key[position:]] = value
    return stripped


class FunctionalClipText:
    """A CLIP text encoder from its weights; ``encode_embeddings`` returns the chosen hidden state of every position.

    ``output_layer``: index of the layer whose output is returned (negative counts from the end, -1 is the last).
    ``final_layer_norm``: apply ``text_model.final_layer_norm`` to that output. The weights are moved to float32 on
    ``device`` (copied when they are inference tensors, which autograd cannot use); nothing modifies them.
    """

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor],
        heads: int,
        activation: str = "quick_gelu",
        output_layer: int = -1,
        final_layer_norm: bool = True,
        device: torch.device | str = "cpu",
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown CLIP activation {activation!r}; known: {sorted(ACTIVATIONS)}")
        weights = _strip_to_text_model(state_dict)
        if "text_model.embeddings.token_embedding.weight" not in weights:
            raise ValueError("not a CLIP text encoder state dict: no 'text_model.embeddings.token_embedding.weight'")
        layer_count = 0
        while f"text_model.encoder.layers.{layer_count}.layer_norm1.weight" in weights:
            layer_count += 1
        if not -layer_count <= output_layer < layer_count:
            raise ValueError(f"output layer {output_layer} does not exist in a CLIP text encoder of {layer_count} layers")
        self.layer_count = layer_count
        self.output_layer = output_layer % layer_count
        self.heads = heads
        self.activation = ACTIVATIONS[activation]
        self.final_layer_norm = final_layer_norm

        def own(key: str) -> torch.Tensor:
            weight = weights[key].detach().to(device=device, dtype=torch.float32)
            return weight.clone() if weight.is_inference() else weight  # autograd cannot save inference tensors

        self.token_embeddings = own("text_model.embeddings.token_embedding.weight")
        self.position_embeddings = own("text_model.embeddings.position_embedding.weight")
        self.layers = [
            {name: own(f"text_model.encoder.layers.{index}.{name}") for name in _LAYER_KEYS}
            for index in range(self.output_layer + 1)
        ]
        self.final_norm = (own("text_model.final_layer_norm.weight"), own("text_model.final_layer_norm.bias"))
        if self.token_embeddings.shape[1] % heads:
            raise ValueError(f"width {self.token_embeddings.shape[1]} is not divisible by {heads} attention heads")

    @property
    def width(self) -> int:
        return self.token_embeddings.shape[1]

    def _self_attention(self, x: torch.Tensor, layer: dict[str, torch.Tensor]) -> torch.Tensor:
        def heads_first(projection: str) -> torch.Tensor:
            projected = F.linear(x, layer[f"self_attn.{projection}.weight"], layer[f"self_attn.{projection}.bias"])
            return projected.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        attended = F.scaled_dot_product_attention(heads_first("q_proj"), heads_first("k_proj"), heads_first("v_proj"),
                                                  is_causal=True)
        return F.linear(attended.transpose(1, 2).flatten(-2), layer["self_attn.out_proj.weight"],
                        layer["self_attn.out_proj.bias"])

    def _layer(self, x: torch.Tensor, layer: dict[str, torch.Tensor]) -> torch.Tensor:
        width = (self.width,)
        x = x + self._self_attention(
            F.layer_norm(x, width, layer["layer_norm1.weight"], layer["layer_norm1.bias"], LAYER_NORM_EPS), layer)
        hidden = F.linear(F.layer_norm(x, width, layer["layer_norm2.weight"], layer["layer_norm2.bias"], LAYER_NORM_EPS),
                          layer["mlp.fc1.weight"], layer["mlp.fc1.bias"])
        return x + F.linear(self.activation(hidden), layer["mlp.fc2.weight"], layer["mlp.fc2.bias"])

    def encode_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Input token embeddings ``[batch, positions, width]`` -> the chosen hidden state ``[batch, positions, width]``."""
        positions = embeddings.shape[1]
        if positions > self.position_embeddings.shape[0]:
            raise ValueError(f"{positions} positions exceed the encoder's context length {self.position_embeddings.shape[0]}")
        x = embeddings.float() + self.position_embeddings[:positions]
        for layer in self.layers:
            x = self._layer(x, layer)
        if self.final_layer_norm:
            x = F.layer_norm(x, (self.width,), *self.final_norm, LAYER_NORM_EPS)
        return x

    def encode_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[batch, positions]`` -> the chosen hidden state."""
        return self.encode_embeddings(self.token_embeddings[token_ids.to(self.token_embeddings.device)])


def text_encoder_access(
    encoders: Sequence[FunctionalClipText], start_token_id: int, end_token_id: int
) -> TextEncoderAccess:
    """One or several CLIP text encoders that share a vocabulary, as caption inversion reads them.

    Several encoders (SDXL: CLIP-L then bigG) are concatenated on the feature axis, in the order given, both in the
    token table and in the output rows, as the diffusion model's context concatenates them.
    """
    if not encoders:
        raise ValueError("no text encoder given")
    vocabularies = {encoder.token_embeddings.shape[0] for encoder in encoders}
    if len(vocabularies) != 1:
        raise ValueError(f"the text encoders have different vocabulary sizes {sorted(vocabularies)}")
    if len(encoders) == 1:
        return TextEncoderAccess(encoders[0].token_embeddings, encoders[0].encode_embeddings, start_token_id, end_token_id)
    widths = [encoder.width for encoder in encoders]

    def encode_concatenated(embeddings: torch.Tensor) -> torch.Tensor:
        parts = embeddings.split(widths, dim=-1)
        return torch.cat([encoder.encode_embeddings(part) for encoder, part in zip(encoders, parts)], dim=-1)

    table = torch.cat([encoder.token_embeddings for encoder in encoders], dim=1)
    return TextEncoderAccess(table, encode_concatenated, start_token_id, end_token_id)
