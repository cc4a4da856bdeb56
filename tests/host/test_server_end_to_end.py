"""End to end through a real ComfyUI server on 127.0.0.1: checkpoint files -> loaders -> text encoders ->
ModelGuidanceSampler -> VAEDecode -> SaveImage, for a DreamBooth pair and a LoRA pair; real PNGs come back."""

from __future__ import annotations

import pytest
from PIL import Image

from tools.host.comfy_server import ComfyServer, execution_error, saved_images
from fixtures.stand_in_models import attack_prompt, write_stand_in_models

SAMPLER_ID = "FineXtractModelGuidanceSampler"
GUIDER_ID = "FineXtractModelGuidanceGuider"


@pytest.fixture(scope="module")
def server(host, tmp_path_factory):  # host: tiny_models builds shapes with ComfyUI's own modules
    base = str(tmp_path_factory.mktemp("comfy-base"))
    write_stand_in_models(f"{base}/models")
    with ComfyServer(base) as running:
        yield running


def test_pack_nodes_are_served_with_tooltips(server):
    info = server.get("/object_info")
    for node_id in (SAMPLER_ID, GUIDER_ID):
        assert node_id in info, f"{node_id} missing from /object_info"
        required = info[node_id]["input"]["required"]
        for name in ("fine_tuned", "pretrained", "positive", "negative", "mode", "guidance_scale", "k"):
            assert required[name][1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert info[SAMPLER_ID]["input"]["required"]["guidance_scale"][1]["default"] == 3.0
    assert info[SAMPLER_ID]["input"]["required"]["k"][1]["default"] == -0.02
    assert info[SAMPLER_ID]["output"] == ["LATENT", "STRING", "FINEXTRACT_RUN_SETTINGS"]
    assert info[GUIDER_ID]["output"] == ["GUIDER"]


def test_dreambooth_and_lora_extractions_save_real_pngs(server):
    images = {}
    for case, fine_tuned in (("dreambooth", ["dreambooth", 0]), ("lora", ["lora", 0])):
        entry = server.run(attack_prompt(fine_tuned, f"e2e_{case}"))
        assert execution_error(entry) is None, execution_error(entry)
        paths = saved_images(entry, server.base)
        assert len(paths) == 2
        images[case] = []
        for path in paths:
            with Image.open(path) as image:
                assert image.format == "PNG" and image.size == (64, 64)
                images[case].append(image.convert("RGB").tobytes())
    assert images["dreambooth"] != images["lora"], "two different fine-tunes gave the same candidates"


def test_bad_pair_is_a_clear_error_and_the_server_keeps_serving(server):
    entry = server.run(attack_prompt(["base", 0], "e2e_same", pretrained=["base", 0]))
    message = execution_error(entry)
    assert message is not None and "same MODEL is connected to both" in message
    entry = server.run(attack_prompt(["dreambooth", 0], "e2e_after_error", mode="cfg"))
    assert execution_error(entry) is None, execution_error(entry)
    assert len(saved_images(entry, server.base)) == 2


def test_cancel_from_comfyui_interrupts_sampling(server):
    """POST /interrupt stops the sampler between steps, as for KSampler, and the next prompt runs."""
    import time

    prompt_id = server.queue(attack_prompt(["lora", 0], "e2e_cancel", steps=2000))
    deadline = time.monotonic() + 60
    while not server.get("/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # inside the sampling loop
    started = time.monotonic()
    server.post("/interrupt", {})
    entry = server.wait(prompt_id, timeout=120)
    assert time.monotonic() - started < 60, "the interrupt was not honoured between steps"
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert not saved_images(entry, server.base)
    entry = server.run(attack_prompt(["lora", 0], "e2e_after_cancel"))
    assert execution_error(entry) is None and len(saved_images(entry, server.base)) == 2
