"""CFG patches on a MODEL are replayed by the guider on its two predictions, or refused naming them; never dropped.

Model guidance is CFG from the pretrained towards the fine-tuned prediction (plus k times the pretrained one's
distance to x), so a patch of ComfyUI's CFG applies to it as it would to KSampler: ComfyUI's RescaleCFG node (a
replaced CFG formula), its Epsilon Scaling node (a post-CFG function) and a pre-CFG function set through
ModelPatcher's own API. Ground truth: each patch's formula written out here, applied to the two models evaluated
alone. Patches only the pretrained MODEL carries, and a replaced batching of the model calls, are refused.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fixtures import tiny_models
from fixtures.guidance_checks import alone, assert_matches, conditioning, one_step, sd15_models

W, K = 3.0, -0.02
SIGMA = 2.5
MULTIPLIER = 0.7  # RescaleCFG's
EPSILON_SCALE = 1.2


@pytest.fixture(scope="module")
def models(host, tmp_path_factory):
    import comfy.sd

    built = sd15_models(tmp_path_factory.mktemp("cfg-patches"))
    built["lora"] = comfy.sd.load_lora_for_models(
        built["base"], None, tiny_models.attention_lora(built["weights"], seed=3), 0.8, 0.0)[0]
    return built


def inputs():
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    return conditioning(768, 5), conditioning(768, 6), noise


def rescale_cfg(cond, uncond, x, sigma, scale, multiplier):
    """RescaleCFG (Lin et al. 2024, Alg. 2) on denoised predictions at input x: CFG and rescaling in v-space."""
    s = torch.as_tensor(sigma).view(-1, 1, 1, 1)

    def to_v(denoised):
        return (x / (1 + s ** 2) - denoised) * (1 + s ** 2) ** 0.5 / s

    v_cond, v_uncond = to_v(cond), to_v(uncond)
    v_cfg = v_uncond + scale * (v_cond - v_uncond)
    v_rescaled = v_cfg * v_cond.std(dim=(1, 2, 3), keepdim=True) / v_cfg.std(dim=(1, 2, 3), keepdim=True)
    v_final = multiplier * v_rescaled + (1 - multiplier) * v_cfg
    return x / (1 + s ** 2) - v_final * s / (1 + s ** 2) ** 0.5


def reference(fine_tuned, pretrained, caption, empty, noise):
    return alone(fine_tuned, caption, noise, SIGMA), alone(pretrained, empty, noise, SIGMA)


@pytest.mark.parametrize("case", ["dreambooth", "lora side branch", "lora hooks"])
def test_rescale_cfg_and_epsilon_scaling_are_replayed(host, models, case):
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    fine_tuned = models["dreambooth" if case == "dreambooth" else "lora"]
    base = models["base"]
    build = functools.partial(host.module("nodes.guider").build_guider, allow_side_branch=case != "lora hooks")
    caption, empty, noise = inputs()
    d_ft, d_pre = reference(fine_tuned, base, caption, empty, noise)

    rescaled = nodes["RescaleCFG"]().patch(fine_tuned, MULTIPLIER)[0]
    x, guided = one_step(build(rescaled, base, caption, empty, "finextract", W, K), noise, SIGMA)
    expected = rescale_cfg(d_ft, d_pre, x, SIGMA, W, MULTIPLIER) + K * (d_pre - x)
    assert_matches(guided, expected, f"{case}: RescaleCFG")
    plain = one_step(build(fine_tuned, base, caption, empty, "finextract", W, K), noise, SIGMA)[1]
    assert (plain - guided).abs().max() > 1e-2 * plain.abs().max(), "RescaleCFG changed nothing"

    # A post-CFG function sees the guided result, correction term included.
    scaled = nodes["Epsilon Scaling"].execute(fine_tuned, EPSILON_SCALE).args[0]
    x, guided = one_step(build(scaled, base, caption, empty, "finextract", W, K), noise, SIGMA)
    finextract = d_pre + W * (d_ft - d_pre) + K * (d_pre - x)
    assert_matches(guided, x - (x - finextract) / EPSILON_SCALE, f"{case}: Epsilon Scaling")


def test_a_pre_cfg_function_sees_the_mode_as_cfg(host, models):
    """A pre-CFG function gets [cond, uncond] = [D_ft(c), D_pre(empty)] at cond_scale w', and what it returns is
    what the guidance combines."""
    base, fine_tuned = models["base"], models["lora"]
    seen = {}

    def halve_towards_uncond(args):
        seen.update(scale=args["cond_scale"], out=[o.clone() for o in args["conds_out"]], x=args["input"].clone())
        cond, uncond = args["conds_out"]
        return [(cond + uncond) / 2, uncond]

    patched = fine_tuned.clone()
    patched.set_model_sampler_pre_cfg_function(halve_towards_uncond)
    caption, empty, noise = inputs()
    d_ft, d_pre = reference(fine_tuned, base, caption, empty, noise)
    x, guided = one_step(host.module("nodes.guider").build_guider(patched, base, caption, empty, "finextract", W, K),
                         noise, SIGMA)
    assert seen["scale"] == W and torch.equal(seen["x"], x)
    assert_matches(seen["out"][0], d_ft, "pre-CFG cond")
    assert_matches(seen["out"][1], d_pre, "pre-CFG uncond")
    half = (d_ft + d_pre) / 2
    assert_matches(guided, d_pre + W * (half - d_pre) + K * (d_pre - x), "pre-CFG result")


def test_direct_mode_evaluates_the_uncond_only_when_a_patch_asks(host, models):
    """As KSampler at cfg 1: the uncond prediction is skipped (zeros, uncond None) unless a patch sets
    disable_cfg1_optimization, and then it is the fine-tuned model's empty-caption prediction."""
    base, fine_tuned = models["base"], models["dreambooth"]
    caption, empty, noise = inputs()
    build = host.module("nodes.guider").build_guider
    for asks in (False, True):
        seen = {}

        def record(args):
            seen.update(uncond=args["uncond"], uncond_denoised=args["uncond_denoised"].clone())
            return args["denoised"]

        patched = fine_tuned.clone()
        patched.set_model_sampler_post_cfg_function(record, disable_cfg1_optimization=asks)
        x, guided = one_step(build(patched, base, caption, empty, "direct", 1.0, 0.0), noise, SIGMA)
        assert_matches(guided, alone(fine_tuned, caption, noise, SIGMA), f"direct (uncond asked: {asks})")
        if asks:
            assert seen["uncond"] is not None
            assert_matches(seen["uncond_denoised"], alone(fine_tuned, empty, noise, SIGMA), "direct's uncond")
        else:
            assert seen["uncond"] is None and not seen["uncond_denoised"].any()


def test_patches_the_guider_cannot_honour_are_refused_naming_them(host, models):
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    base, fine_tuned = models["base"], models["dreambooth"]
    caption, empty, _ = inputs()
    guider = host.module("nodes.guider")
    rescaled_base = nodes["RescaleCFG"]().patch(base, MULTIPLIER)[0]
    with pytest.raises(guider.ModelPairError, match=r"pretrained MODEL carries a CFG patch that the fine-tuned MODEL "
                                                    r"lacks \(sampler_cfg_function: RescaleCFG.patch.<locals>.rescale_cfg"
                                                    r"\).*'fine_tuned' path"):
        guider.build_guider(fine_tuned, rescaled_base, caption, empty, "finextract", W, K)
    # cfg runs the fine-tuned model alone: the pretrained one's patches play no part.
    guider.build_guider(fine_tuned, rescaled_base, caption, empty, "cfg", W, K)
    # The same patch on the base before it branches to both inputs (LoRA) is the fine-tune's too: accepted.
    import comfy.sd

    lora = tiny_models.attention_lora(models["weights"], seed=3)
    both = comfy.sd.load_lora_for_models(rescaled_base, None, lora, 0.8, 0.0)[0]
    assert guider.build_guider(both, rescaled_base, caption, empty, "finextract", W, K).lora_path == "side branch"
    skip_layers = nodes["SkipLayerGuidanceDiTSimple"].execute(fine_tuned, 0.0, 1.0, "1", "").args[0]
    with pytest.raises(guider.ModelPairError, match=r"fine-tuned MODEL carries a patch that replaces how ComfyUI "
                                                    r"batches the model calls \(sampler_calc_cond_batch_function"):
        guider.build_guider(skip_layers, base, caption, empty, "finextract", W, K)
