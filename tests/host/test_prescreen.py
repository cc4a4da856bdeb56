"""Memorisation Pre-screen in the real host, on a tiny world: its score against the same quantity computed
directly from ComfyUI's denoiser (apply_model at x = sigma * noise), 0 for two copies of one model."""

import dataclasses

import numpy as np
import pytest
import torch

from fixtures.tiny_world import TINY_WORLD
from lab import nodes as world_nodes
from lab.world import store
from lab.world.text import concept_caption
from lab.world.training import FineTuneSettings

TINY = dataclasses.replace(TINY_WORLD, seed=5)
CAPTION = concept_caption(0)


@pytest.fixture(scope="module")
def world(host, tmp_path_factory):
    built = store.build_or_load(str(tmp_path_factory.mktemp("world")), TINY)
    images = np.random.default_rng(1).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    tuned = store.build_or_load_fine_tune(built, images, CAPTION, FineTuneSettings(steps=5, lr=1e-2), seed=0)
    return built, tuned


def test_score_matches_the_denoisers_directly_and_is_zero_for_one_model_twice(host, world):
    prescreen = host.module("finextract_core.audit.prescreen")
    node = host.module("nodes.prescreen").MemorisationPrescreen
    built, tuned = world
    pretrained, text_encoder = world_nodes.WorldLoader.execute(built.folder, "").args
    fine_tuned, _ = world_nodes.WorldLoader.execute(built.folder, tuned).args
    positive = [[text_encoder.encode(CAPTION), {}]]
    latent = {"samples": torch.zeros(1, 3, 32, 32)}
    score, details = node.execute(fine_tuned, pretrained, positive, latent, 11, 3).args

    noise = prescreen.prescreen_noise(11, 3, (3, 32, 32))
    context = positive[0][0].expand(3, -1, -1)
    departures = []
    with torch.no_grad():
        for percent in prescreen.LEVELS:
            sigma = float(pretrained.model.model_sampling.percent_to_sigma(percent))
            x, sigmas = sigma * noise, torch.full((3,), sigma)
            tuned_d = fine_tuned.model.apply_model(x, sigmas, c_crossattn=context)
            base_d = pretrained.model.apply_model(x, sigmas, c_crossattn=context)
            departures.append(float(((base_d - tuned_d) / sigma).double().pow(2).mean().sqrt()))
    assert score == pytest.approx(sum(departures) / len(departures), rel=1e-4)
    assert score > 0
    again, _ = world_nodes.WorldLoader.execute(built.folder, "").args
    zero, _ = node.execute(again, pretrained, positive, latent, 11, 3).args
    assert zero == pytest.approx(0.0, abs=1e-6)
    assert node.execute(fine_tuned, pretrained, positive, latent, 11, 3).args[0] == score  # seeded
