"""Caption inversion (the paper's Appendix A): read the training caption from the weights alone.

Fine-tuning moves the cross-attention projections that read the text (every ``attn2.to_k`` / ``attn2.to_v``) by
gradient updates whose rows lie in the span of the training caption's context rows (Eq. 15). So the caption's
embeddings are the directions that the weight change amplifies most (Eq. 17), and a hard prompt whose encoding
maximises that amplification recovers words of the caption (Eq. 19-20).

What "PCA(beta)" means here
---------------------------
``beta`` is the stack of every cross-attention key/value projection of one model, ``[sum of output rows, text_dim]``:
all of them read the same text embedding, so a text embedding ``e`` is indexed by all of them at once. Its rows are
the samples, so its principal directions are directions of the *text* space, and ``PCA(beta)`` is ``beta``
restricted to its top-``rank`` principal directions: ``beta @ P`` with ``P`` the orthogonal projector onto them (a
truncated SVD that keeps the right singular vectors, uncentred because ``beta`` is a linear map applied to ``e``, not
a cloud of points whose mean means something).

The paper takes the principal directions of each model separately. We take them from the two models stacked together
and use the same ``P`` for both, so ``PCA(beta+) - PCA(beta-) = (beta+ - beta-) @ P``. With separate projectors the
difference would carry ``beta- @ (P+ - P-)``: the pretrained weights are large next to what a fine-tune changes, so a
slight rotation between two separately computed subspaces (or a swap of two nearly equal singular values at the cut)
would swamp the signal. The shared projector keeps the paper's intent (read the change only inside the text
directions the models actually use, where real prompts live) and keeps Eq. 15-17 exact: for SGD on a one-token
caption, ``beta+ - beta- = g e0^T``, so the difference is ``g (P e0)^T``, which is ``g e0^T`` whenever ``e0`` lies
in the kept directions (always so with ``rank=None``, which keeps them all), and the argmax of Eq. 17 over
normalised embeddings is ``e0``.

The scorer keeps an equivalent ``[rank, text_dim]`` factor ``R`` with ``||R e|| = ||(beta+ - beta-) P e||`` for
every ``e``, so scoring a whole vocabulary costs one small matrix product.

Which context rows are scored
-----------------------------
The caller's text encoder is causal (CLIP, as in SD 1.x / 2.x / SDXL): the start-token row is the same for every
prompt, and a row depends only on the tokens before it. So a prompt of ``L`` tokens is encoded as
``[start, prompt..., end]`` (``L + 2`` positions, whatever the model's context length: rows that follow cannot change
these) and scored on its ``L`` prompt rows and the end row (the end row summarises the whole prompt, and SD 1.x pads
with copies of the end token, so the fine-tune saw that summary many times). The start row adds nothing but a
constant and is left out; padding is left out because it repeats the end row's information and differs between
model families (end token in SD 1.x, ``!`` in OpenCLIP). Each row is normalised first (Eq. 17 compares normalised
embeddings) and the rows are pooled by root mean square, so prompts of different lengths compare fairly and a
single row scores exactly ``||R e||``.

Directions every prompt shares
------------------------------
Text-encoder outputs are anisotropic: at a given position all prompts share a large common component, so every
training row carries it, the change amplifies it most, and raw F ranks tokens by how "average" their rows are (in
the toy of the tests, the caption's own rows did not stand out and no caption token reached the top 5). The scorer
can therefore remove given ``shared_directions`` (``mean_context_rows``: the average row at each scored position of
random prompts) from every row before normalising it. This keeps Eq. 17 exact: with ``Q`` the projector that removes
them, ``(beta+ - beta-) Q e = g (Q e0)^T (Q e)`` for SGD on ``e0``, and over normalised ``Q e`` this is largest at
``e0``.

The text encoder the caller supplies
------------------------------------
``TextEncoderAccess``: the input token-embedding table ``[vocabulary, token_dim]``, a differentiable function from
input token embeddings ``[batch, positions, token_dim]`` (positional embeddings added inside) to the context rows
``[batch, positions, text_dim]`` that the denoiser's cross-attention reads, and the start/end token ids. An encoder
whose model needs its full context length pads internally and returns the first ``positions`` rows.

SDXL reads two text encoders, CLIP-L (768) and OpenCLIP bigG (1280), whose penultimate hidden states are
concatenated into the 2048-d context. Both tokenizers use the same CLIP BPE vocabulary, so one token id means the same
word in both: the caller concatenates the two token-embedding tables on the feature axis (``[vocabulary, 768 +
1280]``) and its encode function splits the first 768 features to CLIP-L and the rest to bigG and concatenates their
outputs. The search then moves one continuous vector per prompt token whose nearest vocabulary entry is a single id
for both encoders, and the gradient of the score flows back through both.

The hard-prompt search (Eq. 20, after PEZ, Wen et al. 2023): continuous prompt embeddings are projected each step to
their nearest vocabulary entries by cosine similarity (PEZ's choice; the scale of a token embedding carries little
meaning), the projected hard prompt is encoded and scored, and the gradient taken at the projection updates the
continuous embeddings with AdamW. Every projected prompt is a real prompt with an exact score, so the best one seen
over all steps and restarts is kept.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .frozen_linear import FrozenLinear

CROSS_ATTENTION_TEXT_PROJECTIONS = ("attn2.to_k.weight", "attn2.to_v.weight")

NO_CROSS_ATTENTION_MESSAGE = (
    "this model family has no cross-attention on text (no 'attn2.to_k.weight' / 'attn2.to_v.weight' weights); "
    "caption inversion supports SD 1.x / SD 2.x / SDXL UNets. Models such as Flux and SD3 attend to text and image "
    "jointly, so no weight reads the text alone: use the caption the Model Evidence node proposes from the trainer's "
    "metadata, or sample without a caption (mode model_guidance, Eq. 6)"
)
IDENTICAL_MODELS_MESSAGE = (
    "the two models have identical cross-attention projections: the fine-tune did not train them, "
    "or the same model was given twice"
)


@dataclass(frozen=True)
class CrossAttentionProjections:
    """Every cross-attention key/value projection of both models, stacked to ``[sum of output rows, text_dim]``."""

    pretrained: torch.Tensor
    finetuned: torch.Tensor
    keys: tuple[str, ...]

    @property
    def text_dim(self) -> int:
        return self.pretrained.shape[1]


def gather_cross_attention_projections(
    pretrained_state: Mapping[str, torch.Tensor], finetuned_state: Mapping[str, torch.Tensor]
) -> CrossAttentionProjections:
    """Stack the ``attn2.to_k`` / ``attn2.to_v`` weights (any key prefix) of both models in the same key order.

    For a LoRA, pass the patched weights (base + delta) as the fine-tuned state. Raises ValueError when there are no
    such weights, when the two models do not have the same ones with the same shapes, or when none of them differ.
    """
    pretrained_keys = {key for key in pretrained_state if key.endswith(CROSS_ATTENTION_TEXT_PROJECTIONS)}
    finetuned_keys = {key for key in finetuned_state if key.endswith(CROSS_ATTENTION_TEXT_PROJECTIONS)}
    if not pretrained_keys and not finetuned_keys:
        raise ValueError(NO_CROSS_ATTENTION_MESSAGE)
    if pretrained_keys != finetuned_keys:
        unmatched = sorted(pretrained_keys ^ finetuned_keys)
        raise ValueError(
            f"the two models do not have the same cross-attention projections (unmatched: {unmatched[:4]}"
            f"{' ...' if len(unmatched) > 4 else ''}); give a fine-tune of the pretrained model"
        )
    keys = tuple(sorted(pretrained_keys))
    for key in keys:
        if pretrained_state[key].shape != finetuned_state[key].shape:
            raise ValueError(
                f"{key}: pretrained shape {tuple(pretrained_state[key].shape)} differs from fine-tuned shape "
                f"{tuple(finetuned_state[key].shape)}; give a fine-tune of the pretrained model"
            )
    text_dims = {pretrained_state[key].shape[1] for key in keys}
    if len(text_dims) != 1:
        raise ValueError(f"the cross-attention projections read text embeddings of several widths {sorted(text_dims)}")
    if all(torch.equal(pretrained_state[key], finetuned_state[key]) for key in keys):
        raise ValueError(IDENTICAL_MODELS_MESSAGE)
    return CrossAttentionProjections(
        pretrained=torch.cat([pretrained_state[key].detach().float().cpu() for key in keys]),
        finetuned=torch.cat([finetuned_state[key].detach().float().cpu() for key in keys]),
        keys=keys,
    )


def _descending_eigenpairs(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    return eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)


class CaptionScorer:
    """F of Eq. 19: how much the fine-tune changed what the cross-attention makes of a text embedding.

    ``rank`` is the number of principal text directions kept (see the module docstring); ``None`` keeps all of
    them, which makes F exactly the norm of Eq. 17 applied to every projection at once.
    """

    def __init__(
        self,
        projections: CrossAttentionProjections,
        rank: int | None = None,
        shared_directions: torch.Tensor | None = None,
    ):
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be a positive number of principal directions, got {rank}")
        pretrained = projections.pretrained.double()
        finetuned = projections.finetuned.double()
        # The right singular vectors of the two stacks together are the eigenvectors of the sum of their Gram matrices.
        _, directions = _descending_eigenpairs(pretrained.T @ pretrained + finetuned.T @ finetuned)
        principal = directions[:, :rank]
        change_in_principal = (finetuned - pretrained) @ principal
        # ||(beta+ - beta-) P e||^2 = (P^T e)^T G (P^T e) with G the Gram of the change: factor G = W diag(s^2) W^T.
        strengths, change_directions = _descending_eigenpairs(change_in_principal.T @ change_in_principal)
        self.readout = FrozenLinear((strengths.sqrt()[:, None] * (principal @ change_directions).T).float())
        self.rank = principal.shape[1]
        self.shared_basis = (
            None if shared_directions is None else torch.linalg.qr(shared_directions.detach().double().cpu().T).Q.float()
        )

    def score_rows(self, embeddings: torch.Tensor) -> torch.Tensor:
        """F of each embedding ``[..., text_dim]`` after removing the shared directions and normalising: ``[...]``."""
        if self.shared_basis is not None:
            basis = self.shared_basis.to(embeddings)
            embeddings = embeddings - (embeddings @ basis) @ basis.T
        unit = embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(embeddings.dtype).tiny)
        return self.readout(unit).norm(dim=-1)

    def score_sequence(self, context_rows: torch.Tensor) -> torch.Tensor:
        """F of prompts given as context rows ``[..., rows, text_dim]``, pooled by root mean square: returns ``[...]``."""
        return self.score_rows(context_rows).square().mean(dim=-1).sqrt()


@dataclass(frozen=True)
class TextEncoderAccess:
    """The caller's text encoder, as the search needs it (see the module docstring for the contract and SDXL)."""

    token_embeddings: torch.Tensor
    encode_embeddings: Callable[[torch.Tensor], torch.Tensor]
    start_token_id: int
    end_token_id: int
    encode_after_start: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Optional, for a causal encoder that keeps what the start token contributes: input embeddings of the positions
    after the start token -> their rows, the same as ``encode_embeddings`` of the sequence with the start token in
    front, without that token's row."""

    def encode_prompts(self, prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """Context rows of the prompt tokens and the end token, ``[batch, prompt tokens + 1, text_dim]``."""
        batch = prompt_embeddings.shape[0]
        table = self.token_embeddings.to(prompt_embeddings)
        end = table[self.end_token_id].expand(batch, 1, -1)
        if self.encode_after_start is not None:
            return self.encode_after_start(torch.cat([prompt_embeddings, end], dim=1))
        start = table[self.start_token_id].expand(batch, 1, -1)
        return self.encode_embeddings(torch.cat([start, prompt_embeddings, end], dim=1))[:, 1:]

    def candidate_token_ids(self, excluded: Sequence[int] = ()) -> torch.Tensor:
        """Every vocabulary id except the start and end tokens and ``excluded``."""
        allowed = torch.ones(self.token_embeddings.shape[0], dtype=torch.bool)
        allowed[[self.start_token_id, self.end_token_id, *excluded]] = False
        return allowed.nonzero().squeeze(1)


@torch.no_grad()
def mean_context_rows(
    text_encoder: TextEncoderAccess,
    prompt_lengths: Sequence[int],
    samples: int = 256,
    seed: int = 0,
    candidate_token_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The average context row at each scored position of random prompts of each length, stacked.

    Pass them to ``CaptionScorer(shared_directions=...)``: text-encoder outputs share large components at every
    position, which every prompt has and the fine-tune's change therefore amplifies for every prompt alike.
    """
    allowed_ids = text_encoder.candidate_token_ids() if candidate_token_ids is None else candidate_token_ids
    generator = torch.Generator().manual_seed(seed)
    table = text_encoder.token_embeddings
    means = []
    for length in prompt_lengths:
        prompts = allowed_ids[torch.randint(len(allowed_ids), (samples, length), generator=generator)]
        means.append(text_encoder.encode_prompts(table[prompts.to(table.device)]).float().mean(dim=0).cpu())
    return torch.cat(means)


@dataclass(frozen=True)
class PromptCandidate:
    token_ids: tuple[int, ...]
    score: float


@torch.no_grad()
def encode_single_token_prompts(
    text_encoder: TextEncoderAccess, token_ids: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """Context rows ``[len(token_ids), 2, text_dim]`` of every one-token prompt, for ``rank_single_tokens``."""
    table = text_encoder.token_embeddings
    return torch.cat(
        [
            text_encoder.encode_prompts(table[batch_ids.to(table.device), None])
            for batch_ids in token_ids.split(batch_size)
        ]
    )


@torch.no_grad()
def rank_single_tokens(
    scorer: CaptionScorer, token_embeddings: torch.Tensor, token_ids: torch.Tensor, top_k: int = 20
) -> list[PromptCandidate]:
    """The ``top_k`` vocabulary entries by F, best first.

    ``token_embeddings[i]`` belongs to ``token_ids[i]``: either one context-space embedding per token
    ``[tokens, text_dim]`` or the context rows of its one-token prompt ``[tokens, rows, text_dim]`` (from
    ``encode_single_token_prompts``, which scores them exactly as the hard-prompt search scores a prompt of length 1).
    """
    score = scorer.score_rows if token_embeddings.dim() == 2 else scorer.score_sequence
    scores = score(token_embeddings)
    best = scores.topk(min(top_k, scores.shape[0]))
    return [
        PromptCandidate(token_ids=(int(token_ids[index]),), score=float(value))
        for value, index in zip(best.values, best.indices)
    ]


@dataclass(frozen=True)
class HardPromptSearchResult:
    candidates: tuple[PromptCandidate, ...]
    """Distinct prompts met during the search, best first."""

    @property
    def best(self) -> PromptCandidate:
        return self.candidates[0]


def search_hard_prompt(
    scorer: CaptionScorer,
    text_encoder: TextEncoderAccess,
    prompt_tokens: int = 3,
    iterations: int = 1000,
    restarts: int = 4,
    learning_rate: float = 0.1,
    weight_decay: float = 0.1,
    seed: int = 0,
    candidate_token_ids: torch.Tensor | None = None,
    kept_candidates: int = 20,
    on_step: Callable[[int], None] | None = None,
) -> HardPromptSearchResult:
    """Maximise F over hard prompts of ``prompt_tokens`` tokens (Eq. 20) by projected-gradient search (PEZ).

    The restarts run together as one batch, each from its own random prompt drawn with ``seed``; the encoder must be
    deterministic (eval mode) for the result to be. ``candidate_token_ids`` limits the vocabulary the prompt is
    drawn from (default: all but the start and end tokens). ``on_step(steps done)`` is called after every step (a
    progress bar; it may raise to cancel).
    """
    table = text_encoder.token_embeddings
    allowed_ids = (
        text_encoder.candidate_token_ids() if candidate_token_ids is None else candidate_token_ids
    ).to(table.device)
    allowed_table = table[allowed_ids].detach().float()
    # Cosine similarity to every allowed token, for all restarts and positions at once: one product per step.
    cosine_to_allowed = FrozenLinear(torch.nn.functional.normalize(allowed_table, dim=-1))

    generator = torch.Generator().manual_seed(seed)
    start_ids = torch.randint(len(allowed_ids), (restarts, prompt_tokens), generator=generator)
    continuous = allowed_table[start_ids.to(table.device)].clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([continuous], lr=learning_rate, weight_decay=weight_decay)

    seen: dict[tuple[int, ...], float] = {}
    for step in range(iterations + 1):
        with torch.no_grad():
            nearest = cosine_to_allowed(torch.nn.functional.normalize(continuous, dim=-1)).argmax(dim=-1)
        projected = allowed_table[nearest].requires_grad_(True)
        scores = scorer.score_sequence(text_encoder.encode_prompts(projected.to(table.dtype)))
        for ids, score in zip(allowed_ids[nearest].tolist(), scores.tolist()):
            seen[tuple(ids)] = score
        if step == iterations:  # the last pass only scores the final projection
            break
        # PEZ: the gradient taken at the hard prompt moves the continuous embeddings it was projected from.
        continuous.grad = torch.autograd.grad(-scores.sum(), projected)[0]
        optimizer.step()
        if on_step is not None:
            on_step(step + 1)

    ranked = sorted(seen.items(), key=lambda item: item[1], reverse=True)[:kept_candidates]
    return HardPromptSearchResult(tuple(PromptCandidate(token_ids=ids, score=score) for ids, score in ranked))


SHARED_DIRECTION_SAMPLES = 256  # random prompts per length whose mean rows are the shared directions
KEPT_CANDIDATES = 20


@dataclass(frozen=True)
class CaptionInversion:
    scorer: CaptionScorer
    search: HardPromptSearchResult
    single_tokens: tuple[PromptCandidate, ...]
    """The best single-token prompts among the ranked tokens, best first."""


def invert_caption(
    projections: CrossAttentionProjections,
    text_encoder: TextEncoderAccess,
    prompt_tokens: int = 3,
    iterations: int = 1000,
    restarts: int = 4,
    seed: int = 0,
    candidate_token_ids: torch.Tensor | None = None,
    ranked_token_ids: torch.Tensor | None = None,
    rank: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> CaptionInversion:
    """Appendix A end to end: the scorer with the directions that prompts of 1 and ``prompt_tokens`` tokens share
    removed, the hard-prompt search, and the single tokens ``ranked_token_ids`` ranked by F (default: the tokens of
    the search's candidates). ``seed`` seeds both the reference prompts and the search's starting prompts."""
    shared = mean_context_rows(text_encoder, (1, prompt_tokens), samples=SHARED_DIRECTION_SAMPLES, seed=seed,
                               candidate_token_ids=candidate_token_ids)
    scorer = CaptionScorer(projections, rank=rank, shared_directions=shared)
    search = search_hard_prompt(scorer, text_encoder, prompt_tokens=prompt_tokens, iterations=iterations,
                                restarts=restarts, seed=seed, candidate_token_ids=candidate_token_ids,
                                kept_candidates=KEPT_CANDIDATES, on_step=on_step)
    if ranked_token_ids is None:
        ranked_token_ids = torch.tensor(sorted({i for candidate in search.candidates for i in candidate.token_ids}))
    singles = rank_single_tokens(scorer, encode_single_token_prompts(text_encoder, ranked_token_ids), ranked_token_ids,
                                 top_k=KEPT_CANDIDATES)
    return CaptionInversion(scorer, search, tuple(singles))
