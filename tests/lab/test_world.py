"""The proving-ground world's pure parts: tokens, data, modules, training, descriptors and caption recovery, on a
tiny world."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from fixtures.tiny_world import TINY_WORLD as TINY
from lab.world import store
from lab.world.caption import recover_caption, text_encoder_access
from lab.world.data import (default_image_paths, load_image, procedural_batch,
                                        split_concepts)
from lab.world.similarity import highpass_embeddings, pixel_embeddings
from lab.world.text import CONTEXT_LENGTH, VOCABULARY, concept_caption, tokenize
from lab.world.training import (MEMORISATION_CHECK_EVERY, FineTuneSettings, LoRAAdapter, MemorisationProbe,
                                PretrainSettings, diffusion_loss, fine_tune, kohya_key, lora_layer_names, merge_lora)
from lab.world.unet import TransformerBlock


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    torch.set_num_threads(1)
    return store.build_or_load(str(tmp_path_factory.mktemp("world")), TINY)


def test_captions_tokenize_to_a_fixed_length_and_unknown_words_fail():
    ids = tokenize(concept_caption(0))
    assert ids.shape == (CONTEXT_LENGTH,) and [VOCABULARY[i] for i in ids[:5]] == ["<bos>", "a", "sks", "photo", "<eos>"]
    assert [VOCABULARY[i] for i in tokenize("")[:2]] == ["<bos>", "<eos>"]
    with pytest.raises(ValueError, match="not in the world's vocabulary"):
        tokenize("a dog photo")


def test_procedural_data_is_seeded_and_in_range():
    first, captions = procedural_batch(np.random.default_rng(5), 16)
    again, captions_again = procedural_batch(np.random.default_rng(5), 16)
    assert first.shape == (16, 3, 32, 32) and first.dtype == np.float32
    assert np.array_equal(first, again) and captions == captions_again
    assert first.min() >= -1 and first.max() <= 1
    assert all(c == "" or len(c.split()) == 6 for c in captions)


def test_concepts_take_consecutive_files():
    assert split_concepts(list("abcdefg"), 2, 3) == [list("abc"), list("def")]
    with pytest.raises(ValueError, match="need 8 images"):
        split_concepts(list("abcdefg"), 2, 4)


def test_default_images_are_distinct_pictures_on_the_worlds_descriptor():
    paths = default_image_paths()
    images = torch.from_numpy((np.stack([load_image(p) for p in paths]) + 1) / 2)
    similarity = highpass_embeddings(images).similarity(highpass_embeddings(images))
    np.fill_diagonal(similarity, -1)
    # Above 0.6 (the lowest extraction threshold) one generated image could count as extracting both.
    assert similarity.max() < 0.6, [(paths[i], paths[j]) for i, j in zip(*np.nonzero(similarity >= 0.6))]
    assert len(paths) == 24


def test_unet_predicts_an_image_shaped_eps_with_self_and_cross_attention_at_every_resolution(tiny_world):
    x = torch.randn(2, 3, 32, 32)
    context = tiny_world.text_encoder.encode(concept_caption(1)).expand(2, -1, -1)
    tokens_seen = {}

    def record(name):
        def hook(_, inputs, __):
            tokens_seen[name] = (inputs[0].shape[1], inputs[1].shape[1])
        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in tiny_world.unet.named_modules()
             if name.endswith((".attn1", ".attn2"))]
    with torch.no_grad():
        assert tiny_world.unet(x, torch.tensor([10.0, 900.0]), context).shape == x.shape
    for hook in hooks:
        hook.remove()
    names = lora_layer_names(tiny_world.unet)
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_q" in names
    assert "middle_block.1.transformer_blocks.0.attn1.to_out.0" in names
    # (image tokens, tokens attended to) per layer: 32x32 queries read 8x8 pooled keys (TINY pools 4x4 there), the
    # lower levels every token; cross-attention reads the caption's CONTEXT_LENGTH rows. Down and up at each level.
    block = "{}.transformer_blocks.0.{}"
    for level, (path_down, path_up, tokens, keys) in enumerate([("input_blocks.1.1", "output_blocks.2.1", 1024, 64),
                                                                 ("input_blocks.3.1", "output_blocks.1.1", 256, 256),
                                                                 ("input_blocks.5.1", "output_blocks.0.1", 64, 64)]):
        for path in (path_down, path_up):
            assert tokens_seen[block.format(path, "attn1")] == (tokens, keys), (level, path)
            assert tokens_seen[block.format(path, "attn2")] == (tokens, CONTEXT_LENGTH), (level, path)
    assert tokens_seen[block.format("middle_block.1", "attn1")] == (64, 64)


def test_pooled_self_attention_is_softmax_attention_over_the_average_pooled_tokens():
    """attn1 with key_pooling 2, against a hand-written loop over the query tokens."""
    torch.manual_seed(0)
    layer = TransformerBlock(dim=8, context_dim=4, heads=2, key_pooling=2).eval()
    tokens = torch.randn(1, 16, 8)  # a 4x4 grid, row-major as SpatialTransformer flattens it
    normed = layer.norm1(tokens)[0]
    grid = normed.reshape(4, 4, 8)
    pooled = torch.stack([grid[r:r + 2, c:c + 2].reshape(4, 8).mean(0) for r in (0, 2) for c in (0, 2)])
    attention = layer.attn1
    q, k, v = normed @ attention.to_q.weight.T, pooled @ attention.to_k.weight.T, pooled @ attention.to_v.weight.T
    heads = []
    for head in range(2):
        columns = slice(4 * head, 4 * head + 4)
        heads.append(torch.stack([torch.softmax(k[:, columns] @ q[i, columns] / 2.0, dim=0) @ v[:, columns]
                                  for i in range(16)]))
    expected = torch.cat(heads, dim=1) @ attention.to_out[0].weight.T + attention.to_out[0].bias
    with torch.no_grad():
        assert torch.allclose(attention(layer.norm1(tokens), layer._keys(layer.norm1(tokens), (4, 4)))[0], expected,
                              atol=1e-5)


def test_same_spec_same_world_and_the_cache_is_reused(tiny_world, tmp_path):
    rebuilt = store.build_or_load(str(tmp_path / "again"), TINY)
    for name, value in tiny_world.unet.state_dict().items():
        assert torch.equal(value, rebuilt.unet.state_dict()[name]), name
    reloaded = store.build_or_load(tiny_world.folder, TINY)  # loads, does not retrain
    assert torch.equal(reloaded.text_encoder.position_embedding, tiny_world.text_encoder.position_embedding)
    other = dataclasses.replace(TINY, seed=4)
    with pytest.raises(ValueError, match="holds a different world"):
        store.build_or_load(tiny_world.folder, other)


def test_lora_fine_tune_has_kohya_keys_for_every_attention_projection(tiny_world):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    lora = fine_tune(tiny_world.unet, tiny_world.text_encoder, images, concept_caption(0),
                     FineTuneSettings(steps=2, lr=1e-2, rank=2), TINY.schedule, seed=0)
    expected = {kohya_key(p) for p in lora_layer_names(tiny_world.unet)}
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora} == expected
    key = kohya_key("input_blocks.1.1.transformer_blocks.0.attn2.to_k")
    assert lora[f"{key}.lora_down.weight"].shape == (2, 32) and lora[f"{key}.lora_up.weight"].shape == (8, 2)
    assert float(lora[f"{key}.alpha"]) == 2.0
    merged = merge_lora(tiny_world.unet, lora)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500.0])
    context = tiny_world.text_encoder.encode(concept_caption(0))
    with torch.no_grad():
        assert not torch.allclose(merged(x, t, context), tiny_world.unet(x, t, context))


def test_a_locon_adapts_every_transformer_and_resblock_layer_and_merges_as_its_two_convolutions(tiny_world):
    names = set(lora_layer_names(tiny_world.unet, "locon"))
    assert set(lora_layer_names(tiny_world.unet)) < names  # the attention projections, and more
    for path in ("input_blocks.1.0.in_layers.2", "input_blocks.1.0.emb_layers.1", "input_blocks.2.0.op",
                 "output_blocks.0.0.skip_connection", "output_blocks.0.2.conv", "input_blocks.1.1.proj_in",
                 "middle_block.1.transformer_blocks.0.ff.2"):
        assert path in names, path
    assert not names & {"input_blocks.0.0", "out_conv", "time_embed.0", "context_embed"}  # kohya leaves these
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    lora = fine_tune(tiny_world.unet, tiny_world.text_encoder, images, concept_caption(0),
                     FineTuneSettings(steps=2, lr=1e-2, rank=2, lora_layers="locon"), TINY.schedule, seed=0)
    key = kohya_key("input_blocks.2.0.op")  # the 3x3 stride-2 downsampler, 8 channels
    assert lora[f"{key}.lora_down.weight"].shape == (2, 8, 3, 3) and lora[f"{key}.lora_up.weight"].shape == (8, 2, 1, 1)
    # The adapter runs a rank-2 convolution with the base's stride and padding, then a 1x1 one; merged, one kernel
    # W + up @ down: checked on a layer with random factors, against the convolution with the summed kernel.
    torch.manual_seed(0)
    base = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
    adapter = LoRAAdapter(base, rank=2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapter.up.normal_()
        kernel = base.weight + torch.einsum("or,rikl->oikl", adapter.up[:, :, 0, 0], adapter.down)
        x = torch.randn(1, 4, 9, 9)
        assert torch.allclose(adapter(x), torch.nn.functional.conv2d(x, kernel, base.bias, stride=2, padding=1),
                              atol=1e-5)
    merged = merge_lora(tiny_world.unet, lora)
    (down, up) = (lora[f"{key}.lora_down.weight"], lora[f"{key}.lora_up.weight"])
    assert torch.allclose(merged.get_submodule("input_blocks.2.0.op").weight,
                          tiny_world.unet.get_submodule("input_blocks.2.0.op").weight
                          + torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down), atol=1e-6)
    with pytest.raises(ValueError, match="unknown LoRA layers 'all': use one of attention, locon"):
        lora_layer_names(tiny_world.unet, "all")


def test_dreambooth_fine_tune_is_deterministic_and_leaves_the_base_alone(tiny_world):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    before = {k: v.clone() for k, v in tiny_world.unet.state_dict().items()}
    runs = [fine_tune(tiny_world.unet, tiny_world.text_encoder, images, concept_caption(0),
                      FineTuneSettings(steps=2, lr=1e-3), TINY.schedule, seed=1) for _ in range(2)]
    assert runs[0].keys() == before.keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in before)
    assert all(torch.equal(before[k], v) for k, v in tiny_world.unet.state_dict().items())
    assert any(not torch.equal(before[k], runs[0][k]) for k in before)


def test_a_minimum_batch_repeats_every_image_in_each_step(tiny_world):
    """kohya's per-image repeats: a batch of at least 3 draws from two images is [a, b, a, b], so it trains as the
    four-image list with one draw each."""
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    settings = FineTuneSettings(steps=3, lr=1e-2, rank=2)
    repeated = fine_tune(tiny_world.unet, tiny_world.text_encoder, images, concept_caption(0),
                         dataclasses.replace(settings, min_batch=3), TINY.schedule, seed=0)
    listed_twice = fine_tune(tiny_world.unet, tiny_world.text_encoder, torch.cat([images, images]), concept_caption(0),
                             settings, TINY.schedule, seed=0)
    once = fine_tune(tiny_world.unet, tiny_world.text_encoder, images, concept_caption(0), settings, TINY.schedule,
                     seed=0)
    assert all(torch.equal(repeated[k], listed_twice[k]) for k in repeated)
    assert any(not torch.equal(repeated[k], once[k]) for k in repeated)


def test_cosine_decay_halves_the_second_of_two_steps(tiny_world):
    """Over 2 steps the cosine rate is lr, then lr (1 + cos(pi / 2)) / 2 = lr / 2. Both runs take the same first
    step, so they reach the second at the same weights with the same Adam moments, and the decayed run's second
    update is exactly half the constant run's."""
    images = torch.rand(2, 3, 32, 32) * 2 - 1

    def run(steps: int, cosine_decay: bool) -> dict[str, torch.Tensor]:
        return fine_tune(tiny_world.unet, tiny_world.text_encoder, images, concept_caption(0),
                         FineTuneSettings(steps=steps, lr=1e-3, cosine_decay=cosine_decay), TINY.schedule, seed=2)

    first, first_decayed, constant, decayed = run(1, False), run(1, True), run(2, False), run(2, True)
    assert all(torch.equal(first[k], first_decayed[k]) for k in first)
    moved = [k for k in first if first[k].is_floating_point() and not torch.equal(constant[k], first[k])]
    assert len(moved) > 10
    for k in moved:
        torch.testing.assert_close(decayed[k] - first[k], 0.5 * (constant[k] - first[k]), atol=2e-7, rtol=1e-4)


def test_fine_tunes_train_with_the_threads_their_settings_name_and_give_the_caller_its_own_back(tiny_world):
    """The thread count changes the weights' last bits, so it is a setting: the caller's own count must not leak in."""
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    seen = []
    unet = copy.deepcopy(tiny_world.unet)
    unet.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    runs = []
    for caller_threads in (1, 2):
        torch.set_num_threads(caller_threads)
        runs.append(fine_tune(unet, tiny_world.text_encoder, images, concept_caption(0),
                              FineTuneSettings(steps=2, lr=1e-3, threads=3), TINY.schedule, seed=1))
        assert torch.get_num_threads() == caller_threads
    torch.set_num_threads(1)
    assert seen and set(seen) == {3}
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    spec = TINY.to_dict()
    assert spec["pretraining"]["threads"] == 2
    single_threaded = dataclasses.replace(TINY, pretraining=PretrainSettings(steps=3, batch=4, threads=1))
    assert single_threaded.digest() != TINY.digest()


def test_highpass_descriptor_ignores_colour_layout_that_pixels_see():
    rng = np.random.default_rng(0)
    detail = torch.from_numpy(rng.uniform(0, 1, (1, 3, 32, 32)))
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32)
    images = torch.cat([detail, 0.5 * detail + 0.5 * ramp, ramp, torch.flip(ramp, dims=[3])])
    high, pixel = highpass_embeddings(images), pixel_embeddings(images)
    assert high.similarity(high)[0, 1] > 0.95  # same detail on another background
    assert pixel.similarity(pixel)[2, 3] < -0.99 and pixel.similarity(pixel)[0, 1] < high.similarity(high)[0, 1]
    assert np.allclose(np.linalg.norm(high.vectors, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="perfectly flat"):
        highpass_embeddings(torch.full((1, 3, 32, 32), 0.5))


def test_caption_adapter_pads_like_the_tokenizer_so_scored_rows_are_the_trained_rows(tiny_world):
    access = text_encoder_access(tiny_world.text_encoder)
    ids = tokenize("a sks photo")
    rows = access.encode_prompts(access.token_embeddings[ids[1:4]][None])  # [a, sks, photo, <eos>] after padding
    assert torch.allclose(rows, tiny_world.text_encoder.encode("a sks photo")[:, 1:5], atol=1e-5)
    with pytest.raises(ValueError, match="reads 8 positions"):
        access.encode_embeddings(torch.zeros(1, CONTEXT_LENGTH + 1, access.token_embeddings.shape[1]))


def _sgd_on_text_projections(world, caption: str, seed: int) -> torch.nn.Module:
    """The paper's Eq. 15 setting: SGD on every attn2 to_k / to_v alone, images captioned with one caption."""
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(world.unet).requires_grad_(False)
    params = [p for name, p in model.named_parameters() if ".attn2.to_k." in name or ".attn2.to_v." in name]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=0.05)
    images = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    context = world.text_encoder.encode(caption).expand(2, -1, -1)
    for _ in range(30):
        loss = diffusion_loss(model, images, context, world.spec.schedule.alphas_cumprod(), generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("word", ["zwx", "sks", "qlt"])
def test_a_one_word_caption_sgd_trained_into_the_text_projections_is_read_back(tiny_world, word):
    # Measured before asserting: without removing the prompt-shared rows at EVERY position (padding included; the
    # encoder is bidirectional and the fine-tune saw all 8 rows) colour and shape words won for 9 of 9 runs.
    for seed in range(3):
        recovered = recover_caption(tiny_world.unet, _sgd_on_text_projections(tiny_world, word, seed),
                                    tiny_world.text_encoder, words=1, iterations=20, restarts=2, seed=seed)
        assert recovered.words[0][0] == word, (seed, recovered.words[:3])
        assert recovered.exhaustive_best[0] == word
        assert len(recovered.words) == len(VOCABULARY) - 3 and recovered.captions[0][0] == recovered.caption


def test_the_ideal_memoriser_of_one_image_predicts_the_noise_exactly(tiny_world):
    # With one training image the posterior over x0 is certain, so eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar) exactly.
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    probe = MemorisationProbe(image, tiny_world.text_encoder.encode("a sks photo"), TINY.schedule, seed=0)
    assert probe.memoriser_loss < 1e-12
    assert len(probe.steps) == 32 and probe.steps.min() < 100 and probe.steps.max() > 900  # stratified over the schedule
    pretrained = probe.loss(tiny_world.unet)
    assert probe.fraction(pretrained, pretrained) == 0 and probe.fraction(probe.memoriser_loss, pretrained) == 1


def test_fine_tuning_to_a_target_memorisation_stops_at_the_first_check_that_reaches_it(tiny_world):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    capped, targeted = {}, {}
    fine_tune(tiny_world.unet, tiny_world.text_encoder, images, concept_caption(0), FineTuneSettings(100, 1e-2),
              TINY.schedule, seed=0, record=capped)
    assert capped["steps_run"] == 100 and capped["memorisation"] > 0.05
    fine_tune(tiny_world.unet, tiny_world.text_encoder, images, concept_caption(0),
              FineTuneSettings(100, 1e-2, target_memorisation=0.05), TINY.schedule, seed=0, record=targeted)
    assert targeted["steps_run"] < 100 and targeted["steps_run"] % MEMORISATION_CHECK_EVERY == 0
    assert targeted["memorisation"] >= 0.05 and targeted["pretrained_loss"] == capped["pretrained_loss"]


def test_fine_tune_names_change_with_every_setting_and_input():
    images = np.zeros((1, 3, 32, 32), np.float32)
    settings = FineTuneSettings(400, 2e-4)
    name = store.fine_tune_name(images, "a sks photo", settings, 0)
    assert name.startswith("dreambooth-")
    changed = [dataclasses.replace(settings, **{field: value}) for field, value in
               (("steps", 401), ("lr", 3e-4), ("target_memorisation", 0.4), ("threads", 1))]
    others = {store.fine_tune_name(images, "a sks photo", other, 0) for other in changed}
    others |= {store.fine_tune_name(images, "a zwx photo", settings, 0),
               store.fine_tune_name(images, "a sks photo", settings, 1),
               store.fine_tune_name(images + 0.5, "a sks photo", settings, 0)}
    assert len(others) == 7 and name not in others
    assert store.fine_tune_name(images, "a sks photo", dataclasses.replace(settings, rank=4), 0).startswith("lora-")


def test_the_same_fine_tune_built_twice_is_the_same_file_and_describes_itself(tiny_world, tmp_path):
    images = np.asarray(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    settings = FineTuneSettings(steps=2, lr=1e-3)
    worlds = [tiny_world, store.build_or_load(str(tmp_path / "second"), TINY)]
    paths = [store.build_or_load_fine_tune(world, images, concept_caption(1), settings, seed=0) for world in worlds]
    contents = [open(path, "rb").read() for path in paths]
    assert paths[0] != paths[1] and contents[0] == contents[1]  # the audit report hashes these bytes
    described = store.fine_tune_record(paths[0])
    assert (described["caption"], described["style"], described["world"]) == (concept_caption(1), "dreambooth",
                                                                              TINY.digest())
    assert described["settings"] == dataclasses.asdict(settings) and described["record"]["steps_run"] == 2
