"""The guider's refusals and its stacked-LoRA and CFG-patch paths through a real ComfyUI server on 127.0.0.1.

Graphs as users build them: a style LoRA loaded for 'pretrained' by LoraLoader and again for 'fine_tuned' by
LoraLoaderModelOnly with the audited LoRA after it (two loader nodes, so equal tensors, not the same objects);
RescaleCFG on the fine-tuned model; NaN guidance values typed in or linked from a Float node. Each refusal names what
to change, and the server goes on serving the next prompt.
"""

from __future__ import annotations

import math
import os

import pytest

from fixtures import tiny_models
from fixtures.stand_in_models import attack_prompt, write_stand_in_models
from tools.host.comfy_server import ComfyServer, execution_error, saved_images

AUDITED = "audited_locon.safetensors"
STYLE = "style.safetensors"  # the stand-in LoRA, here the style shared by both inputs


@pytest.fixture(scope="module")
def server(host, tmp_path_factory):  # host: tiny_models builds shapes with ComfyUI's own modules
    base = str(tmp_path_factory.mktemp("guider-server"))
    write_stand_in_models(f"{base}/models")
    tiny_models.save_unet(os.path.join(base, "models", "loras", AUDITED),
                          tiny_models.locon(tiny_models.sd15_unet(seed=1), seed=31))
    with ComfyServer(base) as running:
        yield running


def stacked_prompt(prefix: str, swapped: bool = False) -> dict:
    """Style LoRA on both inputs by two loaders, the audited LoCon on the fine-tuned one only."""
    pretrained, fine_tuned = ["style_both", 0], ["audited", 0]
    if swapped:
        pretrained, fine_tuned = fine_tuned, pretrained
    prompt = attack_prompt(fine_tuned, prefix, pretrained=pretrained, guidance_scale=5.0, k=0.0)
    prompt["style_both"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["base", 0], "clip": ["base", 1], "lora_name": STYLE, "strength_model": 1.0, "strength_clip": 1.0}}
    prompt["style_ft"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["base", 0], "lora_name": STYLE, "strength_model": 1.0}}
    prompt["audited"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["style_ft", 0], "lora_name": AUDITED, "strength_model": 1.0}}
    return prompt


def assert_runs(server, prompt) -> list[str]:
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    paths = saved_images(entry, server.base)
    assert len(paths) == 2 and all(os.path.getsize(p) > 0 for p in paths)
    return paths


def test_a_style_lora_loaded_by_two_loaders_is_shared_and_a_swap_is_refused(server):
    assert_runs(server, stacked_prompt("stacked"))
    message = execution_error(server.run(stacked_prompt("stacked_swapped", swapped=True)))
    assert message is not None and message.startswith("FineXtractModelGuidanceSampler:"), message
    assert "are the two inputs swapped?" in message, message
    assert_runs(server, stacked_prompt("stacked_after_swap"))


def test_nan_guidance_values_are_refused_before_sampling(server):
    message = execution_error(server.run(attack_prompt(["dreambooth", 0], "nan_scale", guidance_scale=math.nan)))
    assert message is not None and "'guidance_scale' is nan: it must be a finite number" in message, message
    linked = attack_prompt(["dreambooth", 0], "nan_k")
    linked["k_value"] = {"class_type": "PrimitiveFloat", "inputs": {"value": math.nan}}
    linked["sample"]["inputs"]["k"] = ["k_value", 0]
    message = execution_error(server.run(linked))
    assert message is not None and "'k' is nan" in message and "check what feeds 'k'" in message, message
    assert_runs(server, attack_prompt(["dreambooth", 0], "after_nan"))


def test_rescale_cfg_on_the_fine_tuned_model_runs_and_on_the_pretrained_alone_is_refused(server):
    prompt = attack_prompt(["rescaled", 0], "rescaled")
    prompt["rescaled"] = {"class_type": "RescaleCFG", "inputs": {"model": ["dreambooth", 0], "multiplier": 0.7}}
    rescaled = assert_runs(server, prompt)
    plain = assert_runs(server, attack_prompt(["dreambooth", 0], "not_rescaled"))
    assert [open(p, "rb").read() for p in rescaled] != [open(p, "rb").read() for p in plain], \
        "RescaleCFG made no difference: the patch was dropped"
    prompt = attack_prompt(["dreambooth", 0], "rescaled_base", pretrained=["rescaled", 0])
    prompt["rescaled"] = {"class_type": "RescaleCFG", "inputs": {"model": ["base", 0], "multiplier": 0.7}}
    message = execution_error(server.run(prompt))
    assert message is not None and "pretrained MODEL carries a CFG patch" in message and "rescale_cfg" in message
    assert_runs(server, attack_prompt(["lora", 0], "after_rescale"))
