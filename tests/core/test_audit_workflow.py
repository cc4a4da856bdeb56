"""The audit command's SD workflow builder: the prompt it posts, checked against what the pack's nodes accept (ComfyUI
0.3.75 does not validate V3 combo values, so a value the node does not offer would only fail on a newer ComfyUI)."""
from finextract_core import sscd
from finextract_core.audit.workflow import Base, ExtractionSettings, ModelFile, SDBuilder, extraction_prompt


def sd_prompt(kind: str) -> dict:
    builder = SDBuilder()
    model = ModelFile(path="/models/loras/style.safetensors", root="/models/loras", name="style.safetensors", kind=kind)
    base = Base("/models/checkpoints/base.safetensors", "base.safetensors", "sd15")
    graph = builder.model_graph(model, base, "a sks style")
    graph.nodes.update(builder.reference_nodes(["references", 0]))
    return extraction_prompt(graph, builder, model, "/refs", 2, ExtractionSettings(steps=4), "banks/x", "reports/x")


def test_every_sscd_preset_the_sd_builder_posts_is_one_the_nodes_offer():
    for kind in ("lora", "checkpoint"):
        presets = [node["inputs"]["preset"] for node in sd_prompt(kind).values() if "preset" in node["inputs"]]
        assert presets and set(presets) <= set(sscd.PRESETS), presets


def test_a_lora_is_sampled_on_its_base_and_the_base_is_the_pretrained_branch():
    prompt = sd_prompt("lora")
    bank = prompt["bank"]["inputs"]
    lora = prompt[bank["fine_tuned"][0]]
    assert lora["class_type"] == "LoraLoaderModelOnly" and lora["inputs"]["lora_name"] == "style.safetensors"
    assert lora["inputs"]["model"] == bank["pretrained"]
    assert prompt[bank["pretrained"][0]]["inputs"]["ckpt_name"] == "base.safetensors"
    assert bank["num_candidates"] == 100  # the paper's N = 50 x N0, N0 = 2
