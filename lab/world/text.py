"""The world's text side: a fixed vocabulary, a tokenizer and a small transformer text encoder.

Captions are lower-case words from ``VOCABULARY``; an unknown word is an error (a silently dropped word would train
or sample a different caption than the one asked for). Every caption becomes ``<bos> words <eos> <pad>...`` of
``CONTEXT_LENGTH`` tokens, so the empty caption is a real, learned token sequence, as with CLIP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

COLOURS = {
    "red": (0.85, 0.12, 0.10), "orange": (0.95, 0.55, 0.10), "yellow": (0.95, 0.88, 0.15),
    "green": (0.15, 0.65, 0.20), "cyan": (0.15, 0.80, 0.85), "blue": (0.12, 0.25, 0.85),
    "purple": (0.50, 0.18, 0.65), "pink": (0.95, 0.55, 0.70), "white": (0.95, 0.95, 0.95),
    "black": (0.06, 0.06, 0.06), "brown": (0.45, 0.28, 0.12), "grey": (0.50, 0.50, 0.50),
}
SHAPES = ("circle", "square", "ring", "triangle", "cross", "diamond")
POSITIONS = ("left", "right", "top", "bottom", "centre")  # where the captioned shape sits
TEXTURES = ("plain", "stripes", "checks", "dots", "grain", "clouds", "waves")  # the background's pattern
# Never seen in pretraining: the identifiers of fine-tuning concepts ("a sks photo"), like DreamBooth's rare tokens.
RARE_TOKENS = ("sks", "zwx", "qlt", "vrn", "pqd", "tgm", "bxk", "mfy")
SPECIAL = ("<pad>", "<bos>", "<eos>")
VOCABULARY = SPECIAL + tuple(COLOURS) + SHAPES + POSITIONS + TEXTURES + ("on", "a", "photo") + RARE_TOKENS
CONTEXT_LENGTH = 8


def concept_caption(index: int) -> str:
    """The one training caption of fine-tuning concept ``index``."""
    if not 0 <= index < len(RARE_TOKENS):
        raise ValueError(f"the world has {len(RARE_TOKENS)} rare tokens, so at most {len(RARE_TOKENS)} concepts")
    return f"a {RARE_TOKENS[index]} photo"


def tokenize(caption: str) -> torch.Tensor:
    """Token ids (int64, CONTEXT_LENGTH) of ``caption``."""
    words = caption.lower().split()
    unknown = [w for w in words if w not in VOCABULARY or w in SPECIAL]
    if unknown:
        raise ValueError(f"words {unknown} are not in the world's vocabulary: use {' '.join(VOCABULARY[len(SPECIAL):])}")
    if len(words) > CONTEXT_LENGTH - 2:
        raise ValueError(f"a caption has at most {CONTEXT_LENGTH - 2} words, got {len(words)}: {caption!r}")
    ids = [VOCABULARY.index("<bos>")] + [VOCABULARY.index(w) for w in words] + [VOCABULARY.index("<eos>")]
    return torch.tensor(ids + [VOCABULARY.index("<pad>")] * (CONTEXT_LENGTH - len(ids)), dtype=torch.int64)


@dataclass(frozen=True)
class TextConfig:
    dim: int = 64
    layers: int = 2
    heads: int = 4


class TextEncoder(nn.Module):
    """Token + position embeddings and a small pre-norm transformer: ids (B, L) -> context (B, L, dim)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(len(VOCABULARY), config.dim)
        self.position_embedding = nn.Parameter(torch.zeros(CONTEXT_LENGTH, config.dim))
        layer = nn.TransformerEncoderLayer(config.dim, config.heads, 2 * config.dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(config.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.final_norm(self.encoder(self.token_embedding(ids) + self.position_embedding))

    @torch.no_grad()
    def encode(self, caption: str) -> torch.Tensor:
        """The context (1, CONTEXT_LENGTH, dim) of one caption."""
        return self(tokenize(caption)[None])
