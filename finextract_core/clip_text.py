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
positions gives exactly the first ``n`` rows of an encoding padded to the full context length. For the same reason a
prefix that every sequence shares (the start token) has the same keys and values in every layer whatever follows it:
``encode_prefix`` computes them once and ``encode_embeddings(..., prefix=...)`` encodes only the positions after it,
which gives the same rows as encoding the whole sequence. The linear maps run through ``FrozenLinear`` (oneDNN on
the CPU; the weights never get gradients).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .caption_inversion import TextEncoderAccess
from .frozen_linear import FrozenLinear

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP (CLIP-L)
    "gelu": F.gelu,  # OpenCLIP (ViT-H, bigG)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
LAYER_NORM_EPS = 1e-5  # CLIP's and OpenCLIP's layer_norm_eps

_LAYER_NORMS = ("layer_norm1", "layer_norm2")
_LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class EncodedPrefix:
    """The self-attention keys and values of every layer at the first positions of a sequence, ``[1, heads, positions,
    head width]`` each: what the positions after them read (``FunctionalClipText.encode_prefix``)."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def positions(self) -> int:
        return self.keys[0].shape[2]


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
        self.layers = []
        for index in range(self.output_layer + 1):
            stem = f"text_model.encoder.layers.{index}."
            layer = {name: (own(f"{stem}{name}.weight"), own(f"{stem}{name}.bias")) for name in _LAYER_NORMS}
            layer.update({name: FrozenLinear(own(f"{stem}{name}.weight"), own(f"{stem}{name}.bias"))
                          for name in _LAYER_LINEARS})
            self.layers.append(layer)
        self.final_norm = (own("text_model.final_layer_norm.weight"), own("text_model.final_layer_norm.bias"))
        if self.token_embeddings.shape[1] % heads:
            raise ValueError(f"width {self.token_embeddings.shape[1]} is not divisible by {heads} attention heads")

    @property
    def width(self) -> int:
        return self.token_embeddings.shape[1]

    def _heads_first(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def _layer(self, x: torch.Tensor, layer: dict, prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
        """One layer on ``x``, after the ``prefix`` keys and values if given: returns (output, x's keys, x's values)."""
        width = (self.width,)
        normed = F.layer_norm(x, width, *layer["layer_norm1"], LAYER_NORM_EPS)
        queries, keys, values = (self._heads_first(layer[f"self_attn.{name}"](normed))
                                 for name in ("q_proj", "k_proj", "v_proj"))
        if prefix is None:
            attended = F.scaled_dot_product_attention(queries, keys, values, is_causal=True)
        else:
            batch, _, positions, _ = queries.shape
            read_keys, read_values = (torch.cat([before.expand(batch, -1, -1, -1), own], dim=2)
                                      for before, own in zip(prefix, (keys, values)))
            # Causal after the prefix: the i-th position reads the whole prefix and the positions up to itself.
            visible = torch.ones(positions, read_keys.shape[2], dtype=torch.bool, device=x.device).tril(
                prefix[0].shape[2])
            attended = F.scaled_dot_product_attention(queries, read_keys, read_values, attn_mask=visible)
        x = x + layer["self_attn.out_proj"](attended.transpose(1, 2).flatten(-2))
        hidden = layer["mlp.fc1"](F.layer_norm(x, width, *layer["layer_norm2"], LAYER_NORM_EPS))
        return x + layer["mlp.fc2"](self.activation(hidden)), keys, values

    def _embedded(self, embeddings: torch.Tensor, first_position: int) -> torch.Tensor:
        end = first_position + embeddings.shape[1]
        if end > self.position_embeddings.shape[0]:
            raise ValueError(f"{end} positions exceed the encoder's context length {self.position_embeddings.shape[0]}")
        return embeddings.float() + self.position_embeddings[first_position:end]

    @torch.no_grad()
    def encode_prefix(self, embeddings: torch.Tensor) -> EncodedPrefix:
        """The keys and values every layer computes at the first positions of a sequence, from their input token
        embeddings ``[positions, width]``: pass it to ``encode_embeddings`` to encode the positions after them."""
        x = self._embedded(embeddings[None], 0)
        keys, values = [], []
        for layer in self.layers:
            x, layer_keys, layer_values = self._layer(x, layer)
            keys.append(layer_keys)
            values.append(layer_values)
        return EncodedPrefix(tuple(keys), tuple(values))

    def encode_embeddings(self, embeddings: torch.Tensor, prefix: EncodedPrefix | None = None) -> torch.Tensor:
        """Input token embeddings ``[batch, positions, width]`` -> the chosen hidden state ``[batch, positions, width]``.

        With ``prefix``, the embeddings are those of the positions that follow it, and the rows are theirs.
        """
        x = self._embedded(embeddings, 0 if prefix is None else prefix.positions)
        for index, layer in enumerate(self.layers):
            x = self._layer(x, layer, None if prefix is None else (prefix.keys[index], prefix.values[index]))[0]
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
    token table and in the output rows, as the diffusion model's context concatenates them. Every prompt starts with
    the start token, so each encoder's keys and values there are computed once, here, and prompts are encoded after it.
    """
    if not encoders:
        raise ValueError("no text encoder given")
    vocabularies = {encoder.token_embeddings.shape[0] for encoder in encoders}
    if len(vocabularies) != 1:
        raise ValueError(f"the text encoders have different vocabulary sizes {sorted(vocabularies)}")
    widths = [encoder.width for encoder in encoders]
    start_prefixes = [encoder.encode_prefix(encoder.token_embeddings[start_token_id, None]) for encoder in encoders]

    def encode_concatenated(embeddings: torch.Tensor) -> torch.Tensor:
        parts = embeddings.split(widths, dim=-1)
        return torch.cat([encoder.encode_embeddings(part) for encoder, part in zip(encoders, parts)], dim=-1)

    def encode_after_start(embeddings: torch.Tensor) -> torch.Tensor:
        parts = embeddings.split(widths, dim=-1)
        return torch.cat([encoder.encode_embeddings(part, prefix=start)
                          for encoder, part, start in zip(encoders, parts, start_prefixes)], dim=-1)

    table = encoders[0].token_embeddings if len(encoders) == 1 else torch.cat(
        [encoder.token_embeddings for encoder in encoders], dim=1)
    return TextEncoderAccess(table, encode_concatenated, start_token_id, end_token_id, encode_after_start)
