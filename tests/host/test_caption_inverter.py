"""The Caption Inverter node on the real host: a caption trained into a tiny SD 1.x checkpoint is read back.

Ground truth: the test fine-tunes ONLY the attn2 to_k / to_v weights of a tiny SD 1.x UNet (tiny_models) on the
denoising loss of fixed latents captioned "a sks dog", the caption encoded by the checkpoint's own CLIP through
CLIPTextEncode. Once as a DreamBooth checkpoint (CheckpointLoaderSimple) and once as an attn2-only kohya LoRA
extracted from it (rank-8 truncated SVD, loaded with LoraLoaderModelOnly). The node must rank "sks" among its top 5 single tokens and put it in the best caption.

The functional CLIP the search differentiates through is checked against ComfyUI's own encode of the same tokens,
at the last layer and with clip skip (CLIPSetLastLayer).
"""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

from fixtures import tiny_models

CAPTION = "a sks dog"
DISTINCTIVE = "sks"
# The random CLIP keeps token identity only with larger token embeddings (see tiny_models.save_sd15_checkpoint).
TOKEN_EMBEDDING_SCALE = 6.0
FINE_TUNE_STEPS = 60
FINE_TUNE_LEARNING_RATE = 3e-4
LORA_RANK = 8
# Searching the whole 33k-word vocabulary needs the paper's 1000 iterations (minutes here); the test searches the
# caption's words among DISTRACTORS random whole words, a list the node takes as its search_words input.
DISTRACTORS = 500
SEARCH = dict(max_words=3, iterations=60, restarts=8, seed=0, vocabulary="whole words",
              single_token_ranking="search candidates", excluded_words="")


def fine_tune_text_projections(base: dict[str, torch.Tensor], context: torch.Tensor) -> dict[str, torch.Tensor]:
    """Adam on the denoising loss of four fixed latents captioned with ``context``, through ComfyUI's own UNet class.

    Only attn2.to_k / to_v move; returns their new weights.
    """
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**tiny_models.SD15_UNET, operations=comfy.ops.disable_weight_init)
    unet.load_state_dict(base)
    unet.requires_grad_(False)
    keys = [key for key in sorted(base) if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    deltas = {key: torch.zeros_like(base[key], requires_grad=True) for key in keys}
    optimizer = torch.optim.Adam(deltas.values(), lr=FINE_TUNE_LEARNING_RATE)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=generator)
    for _ in range(FINE_TUNE_STEPS):
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (4,), generator=generator).float()
        signal = torch.cos(timesteps / 1000 * torch.pi / 2)[:, None, None, None] ** 2
        noisy = signal.sqrt() * latents + (1 - signal).sqrt() * noise
        weights = {key: base[key] + deltas[key] for key in keys}
        predicted = torch.func.functional_call(unet, weights, (noisy, timesteps), {"context": context.expand(4, -1, -1)})
        loss = (predicted - noise).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {key: (base[key] + deltas[key]).detach() for key in keys}


def extracted_kohya_lora(base: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fine-tune's attn2 change as a rank-LORA_RANK kohya LoRA (truncated SVD, as LoRA extraction tools do)."""
    lora = {}
    for key, weight in fine_tuned.items():
        left, strengths, right = torch.linalg.svd(weight - base[key], full_matrices=False)
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        lora[f"{name}.lora_up.weight"] = (left[:, :LORA_RANK] * strengths[:LORA_RANK]).contiguous()
        lora[f"{name}.lora_down.weight"] = right[:LORA_RANK].contiguous()
        lora[f"{name}.alpha"] = torch.tensor(float(LORA_RANK))  # alpha = rank: the change is up @ down
    return lora


@pytest.fixture(scope="module")
def setup(host, tmp_path_factory):
    folder = tmp_path_factory.mktemp("captions")
    for sub in ("checkpoints", "loras"):
        (folder / sub).mkdir()
        host.folder_paths.add_model_folder_path(sub, str(folder / sub))
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    base = tiny_models.sd15_unet(seed=1)
    tiny_models.save_sd15_checkpoint(str(folder / "checkpoints" / "caption_base.safetensors"), base,
                                     token_embedding_scale=TOKEN_EMBEDDING_SCALE)
    model, clip = nodes["CheckpointLoaderSimple"]().load_checkpoint("caption_base.safetensors")[:2]
    context = nodes["CLIPTextEncode"]().encode(clip, CAPTION)[0][0][0].clone()

    # fp16 as the checkpoint stores it, so the fine-tunes start from exactly the weights ComfyUI loads.
    base = {key: value.half().float() for key, value in base.items()}
    dreambooth_weights = fine_tune_text_projections(base, context)
    tiny_models.save_sd15_checkpoint(str(folder / "checkpoints" / "caption_dreambooth.safetensors"),
                                     {**base, **dreambooth_weights}, token_embedding_scale=TOKEN_EMBEDDING_SCALE)
    dreambooth = nodes["CheckpointLoaderSimple"]().load_checkpoint("caption_dreambooth.safetensors")[0]
    lora = extracted_kohya_lora(base, dreambooth_weights)
    save_file(lora, str(folder / "loras" / "caption_lora.safetensors"))
    with_lora = nodes["LoraLoaderModelOnly"]().load_lora_model_only(model, "caption_lora.safetensors", 1.0)[0]

    token_texts = host.module("nodes.captions")._token_texts(clip)
    whole_words = sorted(text[:-4] for text in token_texts.values() if text[:-4].isalpha() and text.endswith("</w>")
                         and text[:-4].islower() and text[:-4] not in CAPTION.split())
    generator = torch.Generator().manual_seed(0)
    distractors = [whole_words[i] for i in torch.randperm(len(whole_words), generator=generator)[:DISTRACTORS]]
    return dict(nodes=nodes, host=host, model=model, clip=clip, dreambooth=dreambooth, with_lora=with_lora,
                lora=lora, base=base, search_words=" ".join([*CAPTION.split(), *distractors]),
                captions=host.module("nodes.captions"))


def invert(setup, fine_tuned, **changes):
    inputs = dict(pretrained=setup["model"], fine_tuned=fine_tuned, clip=setup["clip"],
                  search_words=setup["search_words"], **SEARCH)
    with torch.inference_mode():  # as ComfyUI runs a node
        return setup["nodes"]["FineXtractCaptionInverter"].execute(**{**inputs, **changes}).args


def ranked_texts(lines: str) -> list[str]:
    return [line.split("\t")[1] for line in lines.splitlines()]


@pytest.mark.parametrize("case", ["dreambooth", "with_lora"])
def test_the_distinctive_word_of_the_training_caption_is_recovered(setup, case):
    caption, captions, tokens = invert(setup, setup[case])
    assert DISTINCTIVE in ranked_texts(tokens)[:5], tokens
    assert DISTINCTIVE in caption.split(), captions
    assert caption == ranked_texts(captions)[0]
    scores = [float(line.split("\t")[0]) for line in captions.splitlines()]
    assert scores == sorted(scores, reverse=True)


def test_the_lora_is_read_as_comfyui_applies_it_and_equals_the_hand_merged_weights(setup):
    captions = setup["captions"]
    with torch.inference_mode(False):
        applied = captions.effective_weights(setup["with_lora"], "diffusion_model.", captions._is_text_projection)
        unpatched = captions.effective_weights(setup["model"], "diffusion_model.", captions._is_text_projection)
    merged = tiny_models.merge_lora(setup["base"], setup["lora"], strength=1.0)
    assert applied.keys() == unpatched.keys() and len(applied) == 6
    for key, weight in applied.items():
        change = merged[key] - setup["base"][key]
        assert change.abs().max() > 1e-2 * setup["base"][key].abs().max(), key  # the LoRA really moved it
        assert torch.allclose(weight.float(), merged[key], atol=1e-3 * change.abs().max()), key
        assert torch.equal(unpatched[key].float(), setup["base"][key]), key


def test_same_inputs_and_seed_give_the_same_caption(setup):
    first = invert(setup, setup["dreambooth"], iterations=5, seed=3)
    assert invert(setup, setup["dreambooth"], iterations=5, seed=3) == first
    assert invert(setup, setup["dreambooth"], iterations=5, seed=4)[1] != first[1]


@pytest.mark.parametrize("clip_skip", [None, -1, -2, -5])
def test_the_functional_clip_equals_comfyuis_encode_at_the_layer_the_clip_uses(setup, clip_skip):
    clip = setup["clip"]
    if clip_skip is not None:
        clip = setup["nodes"]["CLIPSetLastLayer"]().set_last_layer(clip, clip_skip)[0]
    tokens = clip.tokenize(CAPTION)
    with torch.inference_mode():
        expected = clip.encode_from_tokens(tokens)
    ids = torch.tensor([[token for token, _ in tokens["l"][0]]])
    with torch.inference_mode(False):
        (encoder,) = setup["captions"].functional_text_encoders(clip, "cpu")
        rows = len(CAPTION.split()) + 2
        actual = encoder.encode_ids(ids[:, :rows])
        # What the search runs: the start token's keys and values kept, the caption and end token encoded after it.
        access = setup["captions"].text_encoder_access([encoder], int(ids[0, 0]), int(ids[0, rows - 1]))
        after_start = access.encode_prompts(encoder.token_embeddings[ids[:, 1:rows - 1]])
    assert torch.allclose(actual, expected[:, :rows], atol=1e-4 * expected.abs().max()), (actual - expected[:, :rows]).abs().max()
    assert torch.allclose(after_start, expected[:, 1:rows], atol=1e-4 * expected.abs().max())
    if clip_skip not in (None, -1):  # an earlier layer really is a different output
        with torch.inference_mode():
            last = setup["clip"].encode_from_tokens(tokens)
        assert not torch.allclose(last[:, :rows], expected[:, :rows], atol=1e-2)


def test_bad_pairs_and_mismatched_clips_are_refused_with_advice(setup):
    import comfy.sd

    model = setup["model"]
    with pytest.raises(ValueError, match="same MODEL is connected to 'fine_tuned' and 'pretrained'"):
        invert(setup, model)
    with pytest.raises(ValueError, match="identical cross-attention projections"):
        invert(setup, model.clone())
    # A LoRA on self-attention only: the cross-attention text projections are untouched.
    self_attention_lora = {key: value for key, value in tiny_models.attention_lora(setup["base"], seed=5).items()
                           if "attn1" in key}
    attn1_only = comfy.sd.load_lora_for_models(model, None, self_attention_lora, 1.0, 0.0)[0]
    with pytest.raises(ValueError, match="identical cross-attention projections: the fine-tune did not train them"):
        invert(setup, attn1_only)
    sdxl, sdxl_weights = tiny_models.sdxl_patcher(seed=21)
    with pytest.raises(ValueError, match="different model families.*SDXL.*SD15"):
        invert(setup, sdxl)
    sdxl_finetune, _ = tiny_models.sdxl_patcher(seed=0, unet=tiny_models.fine_tune_of(sdxl_weights, 22))
    with pytest.raises(ValueError, match="768 wide but the model's cross-attention reads 2048-wide"):
        invert(setup, sdxl_finetune, pretrained=sdxl)
    with pytest.raises(ValueError, match="not single tokens of the CLIP vocabulary: qqqzzz"):
        invert(setup, setup["dreambooth"], search_words="sks qqqzzz")


@pytest.mark.parametrize("family", ["flux", "flux_schnell", "sd3"])
def test_flux_and_sd3_are_refused_with_why_and_what_to_use(setup, family):
    """Flux and SD3 attend to text and image jointly (no attn2.to_k / to_v reads the text alone): refused, for a
    LoRA and for a DreamBooth pair alike, naming the evidence reader's caption and the no-caption mode instead."""
    import comfy.sd

    from fixtures import tiny_dits

    base, weights = tiny_dits.patcher(family, seed=1)
    lora = tiny_dits.lora_file(family, tiny_dits.lora_factors(family, weights, seed=3), "transformer")
    with_lora = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)[0]
    dreambooth, _ = tiny_dits.patcher(family, diffusion_model=tiny_models.fine_tune_of(weights, 2))
    for fine_tuned in (with_lora, dreambooth):
        with pytest.raises(ValueError) as refused:
            invert(setup, fine_tuned, pretrained=base)
        message = str(refused.value)
        assert "no cross-attention on text" in message and "attn2.to_k.weight" in message
        assert "Model Evidence" in message and "model_guidance" in message


def small_sdxl_clip(seed: int):
    """ComfyUI's own SDXL CLIP object (CLIP-L + bigG, SDXLClipModel) with reduced widths and depths, random weights."""
    import types

    import comfy.sd
    import comfy.sdxl_clip

    def reduced(width: int, heads: int) -> dict:
        return {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 3, "num_attention_heads": heads}

    target = types.SimpleNamespace(clip=comfy.sdxl_clip.SDXLClipModel, tokenizer=comfy.sdxl_clip.SDXLTokenizer, params={})
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32, "clip_l_model_config": reduced(32, 2),
                                                       "clip_g_model_config": reduced(48, 3)})
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, value in clip.cond_stage_model.state_dict().items():
        scale = 0.3 if value.dim() < 2 else value.shape[-1] ** -0.5
        weights[key] = torch.randn(value.shape, generator=generator) * scale + float("layer_norm" in key and key.endswith("weight"))
    clip.cond_stage_model.load_state_dict(weights, strict=True)
    return clip


def test_an_sdxl_clip_is_read_as_clip_l_and_bigg_penultimate_layers_concatenated_like_comfyuis_encode(setup):
    clip = small_sdxl_clip(seed=0)
    tokens = clip.tokenize(CAPTION)
    with torch.inference_mode():
        expected = clip.encode_from_tokens(tokens)  # SDXLClipModel: cat([clip_l, clip_g]) of penultimate layers
    with torch.inference_mode(False):
        encoders = setup["captions"].functional_text_encoders(clip, "cpu")
        assert [(e.width, e.output_layer, e.final_layer_norm) for e in encoders] == [(32, 1, False), (48, 1, False)]
        access = setup["captions"].text_encoder_access(encoders, 49406, 49407)
        rows = len(CAPTION.split()) + 2
        ids = torch.tensor([[token for token, _ in tokens["l"][0]]])[:, :rows]
        actual = access.encode_embeddings(access.token_embeddings[ids])
    assert expected.shape[-1] == 80
    assert torch.allclose(actual, expected[:, :rows], atol=1e-4 * expected.abs().max())
    # An SDXL CLIP with an SD 1.x model: the widths do not match, and the message says which CLIP to use.
    with pytest.raises(ValueError, match=r"32 \+ 48 = 80 wide but the model's cross-attention reads 768-wide.*SD 1.x: CLIP-L"):
        invert(setup, setup["dreambooth"], clip=clip)
