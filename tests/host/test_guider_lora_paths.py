"""Which path each adapter type takes through the guider on a shared base, and that every path is exact.

A LoRA-style adapter whose delta has a low-rank forward form (LoRA, LoCon with or without a Tucker core, bias
differences) rides beside the base layers as a side branch in one forward; the others (LoHa, LoKr, DoRA) keep
ComfyUI's conditioning hooks. Ground truth as in test_guidance_one_step.py: each model evaluated alone through
ComfyUI's own CFGGuider (ComfyUI merging the adapter into the weights itself), the paper's equations applied by hand.
Stacked adapters (a style LoRA on both inputs, loaded by two loaders, the audited LoRA on the fine-tuned one only)
take the same paths, exactly, and pairs that cannot be split exactly are refused with what to do.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fixtures import tiny_models
from fixtures.guidance_checks import check_guider_step, conditioning, one_step, sd15_models

W, K = 3.0, -0.02
MODES = ["finextract", "model_guidance"]  # the modes that split the base (cfg and direct run the fine-tune alone)
ADAPTERS = {
    "lora": (lambda base: tiny_models.attention_lora(base, seed=3), "side branch"),
    "locon": (lambda base: tiny_models.locon(base, seed=4), "side branch"),
    "locon_tucker": (lambda base: tiny_models.locon(base, seed=5, tucker=True), "side branch"),
    "lora_bias": (lambda base: tiny_models.with_bias_differences(tiny_models.attention_lora(base, seed=6), base, 7),
                  "side branch"),
    "loha": (lambda base: tiny_models.loha(base, seed=8), "conditioning hooks"),
    "lokr": (lambda base: tiny_models.lokr(base, seed=9), "conditioning hooks"),
    "dora": (lambda base: tiny_models.dora(base, seed=10), "conditioning hooks"),
}
# What the hook path's reason names for each adapter that has no low-rank forward form here.
HOOK_REASONS = {"loha": "'loha' adapter", "lokr": "'lokr' adapter", "dora": "DoRA"}


@pytest.fixture(scope="module")
def base_model(host, tmp_path_factory):
    built = sd15_models(tmp_path_factory.mktemp("lora-paths"))
    return built["base"], built["weights"]


def with_adapter(model, adapter: dict, strength: float = 0.8):
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, adapter, strength, 0.0)[0]


def step_inputs():
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    return conditioning(768, 5), conditioning(768, 6), noise, 2.5


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_each_adapter_takes_its_path_and_both_paths_are_exact(host, base_model, adapter):
    base, weights = base_model
    make, expected_path = ADAPTERS[adapter]
    fine_tuned = with_adapter(base, make(weights))
    guider = host.module("nodes.guider")
    pair = guider.pair_models(fine_tuned, base)
    assert (pair.side_branch is not None) == (expected_path == "side branch"), pair.hook_reason
    if adapter in HOOK_REASONS:
        assert HOOK_REASONS[adapter] in pair.hook_reason, pair.hook_reason
    else:
        layers = pair.side_branch.layers.values()
        # The branch covers what each adapter changes: convolutions for LoCon, Tucker cores, bias differences.
        assert any(layer.is_conv for layer in layers) == adapter.startswith("locon")
        assert any(t.mid is not None for layer in layers for t in layer.terms) == (adapter == "locon_tucker")
        assert any(layer.bias_terms for layer in layers) == (adapter == "lora_bias")
    caption, empty, noise, sigma = step_inputs()
    paths = [("auto", True)] + ([("conditioning hooks", False)] if expected_path == "side branch" else [])
    for name, allow in paths:
        build = functools.partial(guider.build_guider, allow_side_branch=allow)
        built = check_guider_step(build, fine_tuned, base, caption, empty, noise, sigma, MODES, W, K,
                                  f"{adapter} ({name})")
        assert built["finextract"].lora_path == (expected_path if allow else "conditioning hooks")


def test_the_side_branch_needs_no_hooks_and_leaves_nothing_behind(host, base_model):
    base, weights = base_model
    fine_tuned = with_adapter(base, tiny_models.locon(weights, seed=4))
    before = {k: v.clone() for k, v in base.model.diffusion_model.state_dict().items()}
    caption, empty, noise, sigma = step_inputs()
    build = host.module("nodes.guider").build_guider
    side = build(fine_tuned, base, caption, empty, "finextract", W, K)
    hooked = build(fine_tuned, base, caption, empty, "finextract", W, K, allow_side_branch=False)
    # No conditioning hooks: a host with dynamic-VRAM patchers has no reason to load a second copy of the base.
    assert not any("hooks" in c for conds in side.original_conds.values() for c in conds)
    assert any("hooks" in c for conds in hooked.original_conds.values() for c in conds)
    one_step(side, noise, sigma)
    modules = [layer.module for layer in side.pair.side_branch.layers.values()]
    assert modules and not any(m._forward_hooks for m in modules), "the side branch's hooks outlived the run"
    after = base.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the base weights changed"


def test_stacked_loras_split_exactly_however_the_graph_loads_the_shared_one(host, base_model):
    """A style LoRA on both inputs (loaded twice, as two loader nodes do: equal tensors, not the same objects) and the
    audited LoRA on the fine-tuned one only: only the audited LoRA goes to the branch, on both paths."""
    base, weights = base_model
    style, audited = tiny_models.attention_lora(weights, seed=21), tiny_models.locon(weights, seed=22)
    pretrained = with_adapter(base, style, 1.0)
    fine_tuned = with_adapter(with_adapter(base, {k: v.clone() for k, v in style.items()}, 1.0), audited)
    guider = host.module("nodes.guider")
    pair = guider.pair_models(fine_tuned, pretrained)
    assert pair.side_branch is not None
    conv_layers = {name for name, layer in pair.side_branch.layers.items() if layer.is_conv}
    assert conv_layers, "the audited LoCon's convolutions are missing from the branch"
    attention = [layer for name, layer in pair.side_branch.layers.items() if ".attn" in name]
    assert attention and all(len(layer.terms) == 1 for layer in attention), "the style LoRA went into the branch too"
    caption, empty, noise, sigma = step_inputs()
    for name, allow in (("side branch", True), ("conditioning hooks", False)):
        build = functools.partial(guider.build_guider, allow_side_branch=allow)
        built = check_guider_step(build, fine_tuned, pretrained, caption, empty, noise, sigma, MODES, W, K,
                                  f"stacked ({name})")
        assert built["finextract"].lora_path == name


def test_pairs_that_cannot_be_split_exactly_are_refused(host, base_model):
    base, weights = base_model
    style, audited = tiny_models.attention_lora(weights, seed=21), tiny_models.attention_lora(weights, seed=22)
    guider = host.module("nodes.guider")
    pretrained = with_adapter(base, style, 1.0)
    fine_tuned = with_adapter(with_adapter(base, dict(style), 1.0), audited)
    with pytest.raises(guider.ModelPairError, match="are the two inputs swapped"):
        guider.pair_models(pretrained, fine_tuned)
    with pytest.raises(guider.ModelPairError, match="or has at another strength"):
        guider.pair_models(with_adapter(with_adapter(base, dict(style), 0.5), audited), pretrained)
    # A shared DoRA renormalises whatever weight it is applied to: the audited LoRA must come after it.
    shared_dora = tiny_models.dora(weights, seed=23)
    pretrained = with_adapter(base, shared_dora, 1.0)
    with pytest.raises(guider.ModelPairError, match="Load the shared LoRA first and the audited LoRA after it"):
        guider.pair_models(with_adapter(with_adapter(base, audited), dict(shared_dora), 1.0), pretrained)
    in_order = with_adapter(with_adapter(base, dict(shared_dora), 1.0), audited)
    assert guider.pair_models(in_order, pretrained).side_branch is not None
    caption, empty, noise, sigma = step_inputs()
    check_guider_step(guider.build_guider, in_order, pretrained, caption, empty, noise, sigma, MODES, W, K,
                      "audited LoRA on a shared DoRA")


def test_a_lora_injected_into_the_forward_pass_is_refused(host, base_model):
    """Newer ComfyUI loads LoRAs in bypass mode as injections into the model's forward pass: on a shared base they
    would reach both branches or neither, so the pair is refused with the loader to use instead."""
    import comfy.patcher_extension

    base, _ = base_model
    fine_tuned = base.clone()  # a bypass loader patches no weight
    fine_tuned.set_injections("bypass_lora", [comfy.patcher_extension.PatcherInjection(lambda p: None, lambda p: None)])
    guider = host.module("nodes.guider")
    with pytest.raises(guider.ModelPairError, match=r"bypass_lora: a LoRA loaded in bypass mode.*LoraLoaderModelOnly"):
        guider.pair_models(fine_tuned, base)


def test_a_base_spread_over_several_gpus_takes_the_hook_path(host, base_model):
    """ComfyUI's MultiGPU support runs parts of a batch on other devices' copies of the model at the same time; it
    carries conditioning hooks over to them, not the side branch's layer hooks."""
    base, weights = base_model
    spread = base.clone()
    spread.set_additional_models("multigpu", [base.clone()])  # what ComfyUI's MultiGPU node adds (one copy per GPU)
    fine_tuned = with_adapter(spread, tiny_models.attention_lora(weights, seed=3))
    pair = host.module("nodes.guider").pair_models(fine_tuned, spread)
    assert pair.side_branch is None and pair.lora_hooks is not None and "MultiGPU" in pair.hook_reason
