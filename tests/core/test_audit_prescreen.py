"""The pre-screen's measure, by hand: eps = (x_t - D) / sigma, so eps_ft - eps_pre = (D_pre - D_ft) / sigma."""

import math

import pytest
import torch

from finextract_core.audit.prescreen import LevelDeparture, eps_departure, prescreen_noise, prescreen_score


def test_departure_is_the_rms_of_the_eps_difference():
    fine_tuned = torch.zeros(2, 3, 4, 4)
    pretrained = torch.zeros(2, 3, 4, 4)
    pretrained[0] = 2.0  # half the elements differ by 2, at sigma 4: eps differs by 0.5 there, 0 elsewhere
    assert eps_departure(fine_tuned, pretrained, 4.0) == pytest.approx(math.sqrt(0.5 ** 2 / 2))
    assert eps_departure(pretrained, pretrained.clone(), 0.3) == 0.0


def test_score_is_the_mean_over_levels_and_bad_inputs_are_refused():
    levels = [LevelDeparture(0.25, 10.0, 0.2), LevelDeparture(0.75, 0.5, 0.4)]
    assert prescreen_score(levels, samples=4, seed=1).score == pytest.approx(0.3)
    with pytest.raises(ValueError, match="shape"):
        eps_departure(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, 4), 1.0)
    with pytest.raises(ValueError, match="positive"):
        eps_departure(torch.zeros(1), torch.zeros(1), 0.0)
    with pytest.raises(FloatingPointError, match="corrupt"):
        eps_departure(torch.full((1,), float("nan")), torch.zeros(1), 1.0)
    with pytest.raises(ValueError, match="at least one"):
        prescreen_score([], samples=1, seed=0)


def test_noise_draws_are_seeded():
    assert torch.equal(prescreen_noise(7, 3, (3, 8, 8)), prescreen_noise(7, 3, (3, 8, 8)))
    assert not torch.equal(prescreen_noise(7, 3, (3, 8, 8)), prescreen_noise(8, 3, (3, 8, 8)))
