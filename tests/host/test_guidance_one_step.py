"""One sampling step of the guider equals Eq. 13 (and Eq. 6, CFG, direct) applied to predictions obtained separately.

Ground truth: each model is evaluated alone through ComfyUI's own CFGGuider at cfg 1 (the fine-tuned model alone,
the pretrained model alone), and the paper's eps-form equations are applied by hand to those predictions. The
guider must match to 1e-5 (relative to the predictions' magnitude), for a DreamBooth pair (two checkpoints) and a LoRA
pair (base + LoRA sharing weights) on both of its paths (the side branch and conditioning hooks), for SD 1.x- and
SDXL-shaped models. The other adapter types: test_guider_lora_paths.py.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fixtures import tiny_models
from fixtures.guidance_checks import alone, assert_matches, check_guider_step, conditioning

W, K = 3.0, -0.02
MODES = ["finextract", "model_guidance", "cfg", "direct"]


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
    assert_matches(alone(with_lora, caption, noise, sigma), alone(merged, caption, noise, sigma),
                   "LoRA applied by ComfyUI vs merged by hand")

    guider = host.module("nodes.guider")
    check_guider_step(guider.build_guider, dreambooth, base, caption, empty, noise, sigma, MODES, W, K,
                      f"{family} dreambooth")
    # Both ways of splitting a shared base: the LoRA as a side branch in one batch, and as conditioning hooks.
    for path, allow_side_branch in (("side branch", True), ("conditioning hooks", False)):
        build = functools.partial(guider.build_guider, allow_side_branch=allow_side_branch)
        built = check_guider_step(build, with_lora, base, caption, empty, noise, sigma, MODES, W, K,
                                  f"{family} lora ({path})")
        assert built["finextract"].lora_path == path and built["model_guidance"].lora_path == path
        assert built["cfg"].lora_path is None  # cfg runs the fine-tuned model alone, the LoRA merged by ComfyUI


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
