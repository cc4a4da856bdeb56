"""One sampling step of the guider on Flux (dev, schnell) and SD3-shaped models equals Eq. 13 (and Eq. 6, CFG, direct)
applied to each model evaluated alone through ComfyUI's own CFGGuider, to 1e-5, as test_guidance_one_step.py checks
for SD 1.x and SDXL: DreamBooth-style (two models) and LoRA-style (base + LoRA through ComfyUI's LoRA loader, in each
key format ComfyUI maps for these families, on the side branch and on conditioning hooks).

The models are ComfyUI's own classes (model_base.Flux / SD3, comfy.ldm.flux, the MMDiT) at reduced sizes, built in
memory (fixtures/tiny_dits.py). Their LoRAs patch fused qkv layers by row blocks (a diffusers to_q / to_k / to_v is a
slice of Flux's qkv): the side branch adds each block to its slice of the layer's output.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from fixtures import tiny_dits
from fixtures.guidance_checks import alone, assert_matches, check_guider_step, one_step, paper_equation

W, K = 3.0, -0.02
MODES = ["finextract", "model_guidance", "cfg", "direct"]
FAMILIES = ["flux", "flux_schnell", "sd3"]
SIGMA = 0.7  # a flow model's sigma lies in (0, 1]
STRENGTH = 0.8


def step_inputs(family):
    # Flux dev: each conditioning carries its own distilled guidance (FluxGuidance); unequal values here, so a guider
    # that gave a branch the other conditioning's value would fail. The others have no guidance input.
    dev = family == "flux"
    caption = tiny_dits.conditioning(family, 5, guidance=2.0 if dev else None)
    empty = tiny_dits.conditioning(family, 6, guidance=1.0 if dev else None, tokens=3)
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    return caption, empty, noise


@functools.cache
def models(family):
    """The base, a DreamBooth fine-tune of it, and the LoRA's factors (as cached per family; patchers are cloned)."""
    base, weights = tiny_dits.patcher(family, seed=1)
    from fixtures.tiny_models import fine_tune_of

    dreambooth, _ = tiny_dits.patcher(family, diffusion_model=fine_tune_of(weights, 2))
    return base, weights, dreambooth, tiny_dits.lora_factors(family, weights, seed=3)


def with_lora(base, tensors, strength=STRENGTH):
    import comfy.sd

    return comfy.sd.load_lora_for_models(base, None, tensors, strength, 0.0)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_dreambooth_pair_step_equals_paper_equations(host, family):
    base, _, dreambooth, _ = models(family)
    caption, empty, noise = step_inputs(family)
    guider = host.module("nodes.guider")
    built = check_guider_step(guider.build_guider, dreambooth, base, caption, empty, noise, SIGMA, MODES, W, K,
                              f"{family} dreambooth")
    assert built["finextract"].separate_pretrained and built["finextract"].lora_path is None


@pytest.mark.parametrize("key_format", tiny_dits.LORA_FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_pair_step_equals_paper_equations_on_both_paths(host, family, key_format):
    base, weights, _, factors = models(family)
    caption, empty, noise = step_inputs(family)
    fine_tuned = with_lora(base, tiny_dits.lora_file(family, factors, key_format))
    # Ground truth for ComfyUI's key map: the LoRA as loaded equals the LoRA folded into the weights by hand.
    merged, _ = tiny_dits.patcher(family, diffusion_model=tiny_dits.merge_lora(weights, factors, STRENGTH))
    assert_matches(alone(fine_tuned, caption, noise, SIGMA), alone(merged, caption, noise, SIGMA),
                   f"{family} {key_format} LoRA loaded by ComfyUI vs merged by hand")
    guider = host.module("nodes.guider")
    pair = guider.pair_models(fine_tuned, base)
    assert pair.side_branch is not None, pair.hook_reason
    # Every target layer is patched; a split format's parts land on their row blocks of the fused layer.
    assert set(pair.side_branch.layers) == {f"diffusion_model.{m}" for m in factors}
    slices = {t.out_slice for layer in pair.side_branch.layers.values() for t in layer.terms}
    assert (slices == {None}) == (key_format == "diffusion_model"), slices
    for path, allow_side_branch in (("side branch", True), ("conditioning hooks", False)):
        build = functools.partial(guider.build_guider, allow_side_branch=allow_side_branch)
        built = check_guider_step(build, fine_tuned, base, caption, empty, noise, SIGMA, MODES, W, K,
                                  f"{family} {key_format} lora ({path})")
        assert built["finextract"].lora_path == path


@pytest.mark.parametrize("family", FAMILIES)
def test_the_step_check_fails_when_the_lora_reaches_every_row(host, family, monkeypatch):
    """The exactness check above would catch a guider that let the LoRA reach the pretrained rows too: with the side
    branch's row selection widened to every row, the step no longer equals Eq. 13."""
    base, _, _, factors = models(family)
    caption, empty, noise = step_inputs(family)
    fine_tuned = with_lora(base, tiny_dits.lora_file(family, factors, "transformer"))
    d_ft_c, d_pre_0 = alone(fine_tuned, caption, noise, SIGMA), alone(base, empty, noise, SIGMA)
    side_branch = host.module("nodes.lora_branch").SideBranch
    exact = side_branch.apply_model_wrapper

    def every_row(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                  **kwargs):
        self.fine_tuned_uuids = frozenset(transformer_options.get("uuids") or [])
        return exact(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    guider = host.module("nodes.guider").build_guider(fine_tuned, base, caption, empty, "finextract", W, K)
    x, guided = one_step(guider, noise, SIGMA)
    assert_matches(guided, paper_equation("finextract", x, SIGMA, d_ft_c, d_ft_c, d_pre_0, W, K), "exact guider")
    monkeypatch.setattr(side_branch, "apply_model_wrapper", every_row)
    guider = host.module("nodes.guider").build_guider(fine_tuned, base, caption, empty, "finextract", W, K)
    x, guided = one_step(guider, noise, SIGMA)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_matches(guided, paper_equation("finextract", x, SIGMA, d_ft_c, d_ft_c, d_pre_0, W, K), "no separation")


def test_flux_dev_branches_take_their_own_conditionings_guidance(host):
    """The distilled guidance travels in the conditioning: the caption branch runs at the caption's FluxGuidance value
    and the empty branch at the empty prompt's (the guide's choice: 1.0 on both, docs/families.md). The value changes
    the prediction, so the check in the tests above is not blind to it."""
    base, _, dreambooth, _ = models("flux")
    caption, _, noise = step_inputs("flux")
    at_one = [[caption[0][0], {**caption[0][1], "guidance": 1.0}]]
    assert (alone(base, caption, noise, SIGMA) - alone(base, at_one, noise, SIGMA)).abs().max() > 1e-3
    schnell, _ = tiny_dits.patcher("flux_schnell", seed=1)
    # Schnell has no guidance embedding: the value is ignored.
    assert torch.equal(alone(schnell, caption, noise, SIGMA), alone(schnell, at_one, noise, SIGMA))


def test_flux_dev_conditionings_without_or_with_unequal_distilled_guidance_are_named_in_the_log(host, caplog):
    """Not an error (the user may choose otherwise), but named: a Flux dev conditioning without FluxGuidance is
    sampled at ComfyUI's 3.5, and unequal values on the two prompts differ from the template's choice."""
    base, _, dreambooth, _ = models("flux")
    caption, empty, _ = step_inputs("flux")  # guidance 2.0 and 1.0
    build = host.module("nodes.guider").build_guider
    bare = [[caption[0][0], {k: v for k, v in caption[0][1].items() if k != "guidance"}]]
    cases = [(bare, empty, "positive conditioning .* carries no FluxGuidance value, so ComfyUI samples it at 3.5"),
             (caption, empty, r"caption's distilled guidance \(\[2.0\]\) differs from the empty prompt's"),
             (empty, empty, None)]
    for positive, negative, expected in cases:
        caplog.clear()
        with caplog.at_level("WARNING", logger="finextract"):
            build(dreambooth, base, positive, negative, "finextract", W, K)
        messages = [r.getMessage() for r in caplog.records if "distilled guidance" in r.getMessage()
                    or "FluxGuidance" in r.getMessage()]
        if expected is None:
            assert not messages, messages
        else:
            assert len(messages) == 1 and re.search(expected, messages[0]), messages
    # Other families have no distilled guidance: nothing to say.
    sd3, _, sd3_dreambooth, _ = models("sd3")
    assert host.module("nodes.guider").distilled_guidance_advice(sd3_dreambooth, *step_inputs("sd3")[:2]) is None
