"""One sampling step of the guider equals Eq. 13 (and Eq. 6, CFG, direct) applied to predictions obtained separately.

Ground truth: each model is evaluated alone through ComfyUI's own CFGGuider at cfg 1 (the fine-tuned model alone,
the pretrained model alone), and the paper's eps-form equations are applied by hand to those predictions. The
guider must match to 1e-5 (relative to the predictions' magnitude), for a DreamBooth pair (two checkpoints) and a LoRA pair (base + LoRA sharing weights), for
SD 1.x- and SDXL-shaped models.
"""

from __future__ import annotations

import pytest
import torch

from fixtures import tiny_models

W, K = 3.0, -0.02
MODES = ["finextract", "model_guidance", "cfg", "direct"]


def one_step(guider, noise: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a guider for a single model call at ``sigma``; returns (x the model saw, denoised prediction)."""
    import comfy.samplers

    seen = {}

    def record(model, x, sigmas, extra_args=None, callback=None, disable=None):
        denoised = model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        seen["x"], seen["denoised"] = x.clone(), denoised.clone()
        return denoised

    sigmas = torch.tensor([sigma, 0.0])
    guider.sample(noise, torch.zeros_like(noise), comfy.samplers.KSAMPLER(record), sigmas, seed=0)
    return seen["x"], seen["denoised"]


def alone(model, cond, noise, sigma):
    """A model evaluated by itself through ComfyUI's standard guider (cfg 1: the conditional prediction only)."""
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(cond, cond)
    guider.set_cfg(1.0)
    return one_step(guider, noise, sigma)[1]


def paper_equation(mode, x, sigma, d_ft_c, d_ft_0, d_pre_0):
    """The paper's equations in eps form, written out (not taken from the pack), converted back to denoised."""
    eps = {name: (x - d) / sigma for name, d in (("ft_c", d_ft_c), ("ft_0", d_ft_0), ("pre_0", d_pre_0))}
    if mode == "finextract":  # Eq. 13
        guided = eps["ft_c"] + (W - 1) * (eps["ft_c"] - eps["pre_0"]) + K * eps["pre_0"]
    elif mode == "model_guidance":  # Eq. 6
        guided = eps["ft_0"] + (W - 1) * (eps["ft_0"] - eps["pre_0"])
    elif mode == "cfg":  # Eq. 8 on the fine-tuned model
        guided = eps["ft_0"] + W * (eps["ft_c"] - eps["ft_0"])
    else:
        guided = eps["ft_c"]
    return x - sigma * guided


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str, tolerance: float = 1e-5):
    """Max error within ``tolerance`` of the prediction's scale. Batching cond and uncond together (as ComfyUI does)
    instead of one at a time moves fp32 results by a few 1e-6 of their magnitude, so an absolute bound would test
    the CPU's summation order, not the guidance."""
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= tolerance * scale, f"{what}: max error {error:.3g} exceeds {tolerance} x {scale:.3g}"


def conditioning(context_dim: int, seed: int, pooled: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=gen)}
    return [[torch.randn(1, 77, context_dim, generator=gen), extra]]


def sd15_pairs(host, tmp_path):
    import comfy.sd
    import comfy.utils

    base_weights = tiny_models.sd15_unet(seed=1)
    base_path = tiny_models.save_unet(str(tmp_path / "base.safetensors"), base_weights)
    ft_path = tiny_models.save_unet(str(tmp_path / "dreambooth.safetensors"), tiny_models.fine_tune_of(base_weights, 2))
    lora = tiny_models.attention_lora(base_weights, seed=3)
    merged_path = tiny_models.save_unet(str(tmp_path / "merged.safetensors"),
                                        tiny_models.merge_lora(base_weights, lora, strength=0.8))
    base = comfy.sd.load_diffusion_model(base_path)
    dreambooth = comfy.sd.load_diffusion_model(ft_path)
    with_lora = comfy.sd.load_lora_for_models(base, None, lora, 0.8, 0.0)[0]
    merged = comfy.sd.load_diffusion_model(merged_path)
    return base, dreambooth, with_lora, merged


def sdxl_pairs():
    import comfy.sd

    base, base_weights = tiny_models.sdxl_patcher(seed=11)
    dreambooth, _ = tiny_models.sdxl_patcher(seed=0, unet=tiny_models.fine_tune_of(base_weights, 12))
    lora = tiny_models.attention_lora(base_weights, seed=13)
    with_lora = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)[0]
    merged, _ = tiny_models.sdxl_patcher(seed=0, unet=tiny_models.merge_lora(base_weights, lora, strength=1.0))
    return base, dreambooth, with_lora, merged


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_guider_step_equals_paper_equations(host, tmp_path, family):
    if family == "sd15":
        base, dreambooth, with_lora, merged = sd15_pairs(host, tmp_path)
        caption, empty = conditioning(768, 5), conditioning(768, 6)
    else:
        base, dreambooth, with_lora, merged = sdxl_pairs()
        caption, empty = conditioning(2048, 5, pooled=1280), conditioning(2048, 6, pooled=1280)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    sigma = 2.5

    # The LoRA as ComfyUI applies it agrees with the LoRA folded in by hand: the reference itself is right.
    d_lora = alone(with_lora, caption, noise, sigma)
    assert_matches(d_lora, alone(merged, caption, noise, sigma), "LoRA applied by ComfyUI vs merged by hand")

    for case, fine_tuned in (("dreambooth", dreambooth), ("lora", with_lora)):
        d_ft_c = alone(fine_tuned, caption, noise, sigma)
        d_ft_0 = alone(fine_tuned, empty, noise, sigma)
        d_pre_0 = alone(base, empty, noise, sigma)
        # The fine-tune must move the prediction far beyond the tolerance, or a guider that used one model's
        # weights for both branches would pass.
        effect = (d_ft_c - alone(base, caption, noise, sigma)).abs().max().item()
        assert effect > 1e-3 * d_ft_c.abs().max().item(), f"{case}: the fine-tune barely changes the model"
        for mode in MODES:
            guider = host.module("nodes.guider").build_guider(fine_tuned, base, caption, empty, mode, W, K)
            x, guided = one_step(guider, noise, sigma)
            expected = paper_equation(mode, x, sigma, d_ft_c, d_ft_0, d_pre_0)
            assert_matches(guided, expected, f"{family} {case} {mode}")
        # Evaluating the base alone after a shared-weights run still gives the base: no LoRA left behind.
        assert_matches(alone(base, empty, noise, sigma), d_pre_0, "base after a shared-weights run")


def test_pairing_errors_say_what_to_do(host, tmp_path):
    import comfy.sd

    base, dreambooth, with_lora, _ = sd15_pairs(host, tmp_path)
    sdxl, _ = tiny_models.sdxl_patcher(seed=21)
    empty = conditioning(768, 6)
    build = host.module("nodes.guider").build_guider
    error = host.module("nodes.guider").ModelPairError

    with pytest.raises(error, match="same MODEL is connected to both"):
        build(base, base, empty, empty, "finextract", W, K)
    with pytest.raises(error, match="same weights"):
        build(base.clone(), base, empty, empty, "finextract", W, K)
    with pytest.raises(error, match="different model families.*SDXL.*SD15|different model families.*SD15.*SDXL"):
        build(sdxl, base, empty, empty, "finextract", W, K)
    with pytest.raises(error, match="swapped"):
        build(base, with_lora, empty, empty, "finextract", W, K)
    # A LoRA whose keys match nothing in the base leaves the model unpatched: reported as the same weights.
    stray = {"lora_unet_not_a_layer.lora_up.weight": torch.zeros(4, 4),
             "lora_unet_not_a_layer.lora_down.weight": torch.zeros(4, 4)}
    with pytest.raises(error, match="same weights"):
        build(comfy.sd.load_lora_for_models(base, None, stray, 1.0, 0.0)[0], base, empty, empty, "finextract", W, K)
