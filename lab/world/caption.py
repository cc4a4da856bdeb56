"""Caption inversion (the paper's Appendix A) on the world: the adapter that lets the pack's caption inverter read the
world's own text encoder, and the recovery of a fine-tune's caption from the two UNets' weights alone.

The inverter (``finextract_core.caption_inversion``) was written for CLIP, whose rows depend only on the tokens before
them, so it encodes ``[start, prompt..., end]`` and nothing after. The world's encoder is bidirectional and always
reads ``CONTEXT_LENGTH`` positions, padding included, so every row depends on the whole padded sequence. The adapter
therefore pads the given embeddings with the ``<pad>`` token's embedding to ``CONTEXT_LENGTH``, exactly as the
tokenizer pads a caption, and returns the first rows: the rows the inverter scores are then the very rows the
fine-tune trained on (a test checks this equality). The start row is dropped by the scorer (here it is not constant,
but it is never scored), the end row summarises the prompt, the padding rows are not scored.

One assumption needs adapting: the scorer removes the directions every prompt shares, and the inverter's
``mean_context_rows`` takes them at the scored positions only. A fine-tune of the world trains on all eight rows of its
caption, padding and start row included, and in a bidirectional encoder each of those rows carries its own
prompt-shared component; the weight change amplifies them, and words were then ranked by how much they resemble the
padding (on SGD-trained one-word captions, a colour or shape word won every time). So the shared directions given to
the scorer are the mean rows at every position of random padded prompts.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..product import pack_module
from .text import CONTEXT_LENGTH, SPECIAL, VOCABULARY, TextEncoder
from .unet import WorldUNet

_inversion = pack_module("finextract_core.caption_inversion")
CaptionScorer, TextEncoderAccess = _inversion.CaptionScorer, _inversion.TextEncoderAccess
gather_cross_attention_projections = _inversion.gather_cross_attention_projections
rank_single_tokens, search_hard_prompt = _inversion.rank_single_tokens, _inversion.search_hard_prompt
PAD_ID, BOS_ID, EOS_ID = (VOCABULARY.index(t) for t in ("<pad>", "<bos>", "<eos>"))
WORD_IDS = torch.tensor([i for i, token in enumerate(VOCABULARY) if token not in SPECIAL])


def text_encoder_access(text_encoder: TextEncoder) -> TextEncoderAccess:
    """The world's encoder as the inverter needs it: embeddings in, the rows of the padded sequence out."""
    table = text_encoder.token_embedding.weight.detach()

    def encode_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
        batch, positions, _ = embeddings.shape
        if positions > CONTEXT_LENGTH:
            raise ValueError(f"the world's text encoder reads {CONTEXT_LENGTH} positions, got {positions}")
        padding = table[PAD_ID].to(embeddings).expand(batch, CONTEXT_LENGTH - positions, -1)
        sequence = torch.cat([embeddings, padding], dim=1) + text_encoder.position_embedding.to(embeddings)
        return text_encoder.final_norm(text_encoder.encoder(sequence))[:, :positions]

    return TextEncoderAccess(token_embeddings=table, encode_embeddings=encode_embeddings, start_token_id=BOS_ID,
                             end_token_id=EOS_ID)


@dataclass(frozen=True)
class CaptionRecovery:
    caption: str
    """The best hard prompt the search found (feed it to the text encoder like any caption)."""
    captions: tuple[tuple[str, float], ...]
    """Distinct prompts met by the search with their F, best first."""
    words: tuple[tuple[str, float], ...]
    """Every word of the vocabulary as a one-word prompt, by F, best first."""
    exhaustive_best: tuple[str, float]
    """The best prompt of the same length over the whole vocabulary (the world's is small enough to try them all):
    how close the search came to the true maximum of F."""


def _words(ids) -> str:
    return " ".join(VOCABULARY[int(i)] for i in ids)


@torch.no_grad()
def _exhaustive_best(scorer: CaptionScorer, access: TextEncoderAccess, words: int) -> tuple[str, float]:
    best, best_score = None, -1.0
    table = access.token_embeddings
    prompts = torch.tensor(list(itertools.product(WORD_IDS.tolist(), repeat=words)))
    for chunk in prompts.split(4096):
        scores = scorer.score_sequence(access.encode_prompts(table[chunk]))
        top = int(scores.argmax())
        if float(scores[top]) > best_score:
            best, best_score = chunk[top], float(scores[top])
    return _words(best), best_score


@torch.no_grad()
def _mean_rows_at_every_position(access: TextEncoderAccess, prompt_lengths: list[int], seed: int,
                                 samples: int = 256) -> torch.Tensor:
    """The average row at every position (start and padding included) of random padded prompts of each length."""
    generator = torch.Generator().manual_seed(seed)
    means = []
    for length in prompt_lengths:
        ids = torch.full((samples, CONTEXT_LENGTH), PAD_ID)
        ids[:, 0], ids[:, length + 1] = BOS_ID, EOS_ID
        ids[:, 1:length + 1] = WORD_IDS[torch.randint(len(WORD_IDS), (samples, length), generator=generator)]
        means.append(access.encode_embeddings(access.token_embeddings[ids]).mean(dim=0))
    return torch.cat(means)


def recover_caption(pretrained: WorldUNet, fine_tuned: WorldUNet, text_encoder: TextEncoder, words: int = 3,
                    iterations: int = 300, restarts: int = 8, seed: int = 0) -> CaptionRecovery:
    """The caption a fine-tune was trained on, read from the change of its attn2 to_k / to_v (for a LoRA, pass the
    merged UNet), by the pack's scorer (Eq. 19, prompt-shared directions removed) and hard-prompt search (Eq. 20)."""
    access = text_encoder_access(text_encoder.eval())
    projections = gather_cross_attention_projections(pretrained.state_dict(), fine_tuned.state_dict())
    shared = _mean_rows_at_every_position(access, sorted({1, words}), seed)
    scorer = CaptionScorer(projections, shared_directions=shared)
    table = access.token_embeddings
    with torch.no_grad():
        one_word_rows = access.encode_prompts(table[WORD_IDS, None])
    ranked_words = rank_single_tokens(scorer, one_word_rows, WORD_IDS, top_k=len(WORD_IDS))
    search = search_hard_prompt(scorer, access, prompt_tokens=words, iterations=iterations, restarts=restarts,
                                seed=seed, candidate_token_ids=WORD_IDS)
    return CaptionRecovery(caption=_words(search.best.token_ids),
                           captions=tuple((_words(c.token_ids), c.score) for c in search.candidates),
                           words=tuple((VOCABULARY[c.token_ids[0]], c.score) for c in ranked_words),
                           exhaustive_best=_exhaustive_best(scorer, access, words))
