"""The functional CLIP text encoder against an independent implementation (transformers' CLIPTextModel)."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from finextract_core.clip_text import FunctionalClipText, text_encoder_access
from fixtures.caption_trials import onednn_enabled

VOCABULARY = 300
START, END = VOCABULARY - 2, VOCABULARY - 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_clip(seed: int, width: int = 64, layers: int = 3, heads: int = 4, activation: str = "quick_gelu"):
    config = CLIPTextConfig(vocab_size=VOCABULARY, hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=12,
                            hidden_act=activation, bos_token_id=START, eos_token_id=END, pad_token_id=END)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPTextModel(config).eval().requires_grad_(False)
        # transformers initialises LayerNorms at identity / zero: move them so the test sees whether each is applied.
        for name, parameter in model.named_parameters():
            if "layer_norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model


def text_model_state(model: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The weights under the ``text_model.`` keys of CLIP checkpoint files and of ComfyUI (transformers 5 drops it)."""
    return {f"text_model.{key}": value for key, value in model.state_dict().items()}


def ids(batch: int, positions: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(VOCABULARY - 2, (batch, positions), generator=generator)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_last_layer_after_final_norm_equals_transformers(activation):
    model = reference_clip(0, activation=activation)
    encoder = FunctionalClipText(text_model_state(model), heads=4, activation=activation)
    tokens = ids(3, 12)
    expected = model(input_ids=tokens).last_hidden_state
    assert torch.allclose(encoder.encode_ids(tokens), expected, atol=1e-5)


def test_hidden_layers_with_and_without_final_norm_equal_transformers():
    model = reference_clip(1, layers=4)
    tokens = ids(2, 9)
    hidden_states = model(input_ids=tokens, output_hidden_states=True).hidden_states  # [0] is the input embedding
    penultimate = FunctionalClipText(text_model_state(model), heads=4, output_layer=-2, final_layer_norm=False)
    assert torch.allclose(penultimate.encode_ids(tokens), hidden_states[-2], atol=1e-5)
    assert len(penultimate.layers) == 3  # the last layer is never run
    second_normed = FunctionalClipText(text_model_state(model), heads=4, output_layer=1, final_layer_norm=True)
    assert torch.allclose(second_normed.encode_ids(tokens), model.final_layer_norm(hidden_states[2]), atol=1e-5)


def test_a_prefix_is_ignored_and_short_sequences_equal_the_start_of_padded_ones():
    model = reference_clip(2)
    prefixed = {f"cond_stage_model.transformer.{key}": value for key, value in text_model_state(model).items()}
    encoder = FunctionalClipText(prefixed, heads=4)
    tokens = ids(2, 12, seed=5)
    assert torch.allclose(encoder.encode_ids(tokens[:, :5]), encoder.encode_ids(tokens)[:, :5], atol=1e-5)


def test_gradients_flow_to_the_input_embeddings_even_from_inference_mode_weights():
    model = reference_clip(3)
    with torch.inference_mode():
        frozen = {key: value.clone() for key, value in text_model_state(model).items()}
    encoder = FunctionalClipText(frozen, heads=4)
    embeddings = encoder.token_embeddings[ids(1, 4)].clone().requires_grad_(True)
    encoder.encode_embeddings(embeddings).square().sum().backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    # Check the gradient itself against a finite difference of one coordinate.
    step = 1e-2
    shifted = embeddings.detach().clone()
    shifted[0, 1, 3] += step
    with torch.no_grad():
        difference = (encoder.encode_embeddings(shifted).square().sum()
                      - encoder.encode_embeddings(embeddings.detach()).square().sum()) / step
    assert float(difference) == pytest.approx(float(embeddings.grad[0, 1, 3]), rel=0.05, abs=1e-3)


def test_two_encoders_concatenate_their_tables_and_outputs_on_the_feature_axis():
    first = FunctionalClipText(text_model_state(reference_clip(4, width=32, heads=2)), heads=2, output_layer=-2,
                               final_layer_norm=False)
    second = FunctionalClipText(text_model_state(reference_clip(5, width=48, heads=3, activation="gelu")), heads=3,
                                activation="gelu", output_layer=-2, final_layer_norm=False)
    access = text_encoder_access([first, second], START, END)
    assert access.token_embeddings.shape == (VOCABULARY, 80)
    tokens = ids(2, 6, seed=9)
    expected = torch.cat([first.encode_ids(tokens), second.encode_ids(tokens)], dim=-1)
    assert torch.allclose(access.encode_embeddings(access.token_embeddings[tokens]), expected, atol=1e-6)
    # Each encoder keeps its own start token: prompts encoded after them give the same concatenated rows.
    tokens[:, 0], tokens[:, -1] = START, END
    expected = torch.cat([first.encode_ids(tokens), second.encode_ids(tokens)], dim=-1)
    assert torch.allclose(access.encode_prompts(access.token_embeddings[tokens[:, 1:-1]]), expected[:, 1:], atol=1e-5)


def test_bad_settings_are_refused_with_what_exists():
    state = text_model_state(reference_clip(6))
    with pytest.raises(ValueError, match="output layer 3 does not exist in a CLIP text encoder of 3 layers"):
        FunctionalClipText(state, heads=4, output_layer=3)
    with pytest.raises(ValueError, match="unknown CLIP activation 'relu'"):
        FunctionalClipText(state, heads=4, activation="relu")
    with pytest.raises(ValueError, match="not a CLIP text encoder"):
        FunctionalClipText({"model.diffusion_model.x.weight": torch.zeros(1)}, heads=4)
    with pytest.raises(ValueError, match="exceed the encoder's context length 12"):
        FunctionalClipText(state, heads=4).encode_ids(ids(1, 13))


def rows_after_a_shared_prefix(prefix_length: int, batch: int = 3, positions: int = 8, seed: int = 11) -> torch.Tensor:
    tokens = ids(batch, positions, seed=seed)
    tokens[:, :prefix_length] = tokens[0, :prefix_length]
    return tokens


@pytest.mark.parametrize("prefix_length", [1, 3])
@pytest.mark.parametrize("output_layer, final_norm", [(-1, True), (-2, False)])
def test_positions_after_an_encoded_prefix_equal_transformers_rows_of_the_whole_sequence(prefix_length, output_layer,
                                                                                          final_norm):
    model = reference_clip(7)
    tokens = rows_after_a_shared_prefix(prefix_length)
    hidden = model(input_ids=tokens, output_hidden_states=True).hidden_states[output_layer]
    expected = model.final_layer_norm(hidden) if final_norm else hidden
    encoder = FunctionalClipText(text_model_state(model), heads=4, output_layer=output_layer,
                                 final_layer_norm=final_norm)
    prefix = encoder.encode_prefix(encoder.token_embeddings[tokens[0, :prefix_length]])
    assert prefix.positions == prefix_length and len(prefix.keys) == len(encoder.layers)
    actual = encoder.encode_embeddings(encoder.token_embeddings[tokens[:, prefix_length:]], prefix=prefix)
    assert torch.allclose(actual, expected[:, prefix_length:], atol=1e-5)


@pytest.mark.parametrize("onednn", [True, False])
def test_prompts_encoded_after_the_kept_start_token_give_transformers_rows_and_gradients(onednn):
    """What the search runs: [start, prompt, end] without re-encoding the start token, differentiated."""
    model = reference_clip(8)
    with onednn_enabled(onednn):
        access = text_encoder_access([FunctionalClipText(text_model_state(model), heads=4)], START, END)
    prompts = ids(3, 4, seed=12)
    probe = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(13))

    embeddings = access.token_embeddings[prompts].clone().requires_grad_(True)
    rows = access.encode_prompts(embeddings)
    (gradient,) = torch.autograd.grad((probe * rows).sum(), embeddings)

    reference_embeddings = model.get_input_embeddings().weight[prompts].clone().requires_grad_(True)
    batch = len(prompts)
    table = model.get_input_embeddings().weight
    sequence = torch.cat([table[START].expand(batch, 1, -1), reference_embeddings, table[END].expand(batch, 1, -1)], 1)
    hidden = model.encoder(inputs_embeds=sequence + model.embeddings.position_embedding.weight[:6],
                           is_causal=True).last_hidden_state
    expected = model.final_layer_norm(hidden)[:, 1:]
    (expected_gradient,) = torch.autograd.grad((probe * expected).sum(), reference_embeddings)
    assert torch.allclose(rows, expected, atol=1e-5)
    assert torch.allclose(gradient, expected_gradient, atol=1e-5 * float(expected_gradient.abs().max()))


def test_a_prefix_counts_towards_the_context_length():
    encoder = FunctionalClipText(text_model_state(reference_clip(6)), heads=4)
    prefix = encoder.encode_prefix(encoder.token_embeddings[ids(1, 2)[0]])
    with pytest.raises(ValueError, match="13 positions exceed the encoder's context length 12"):
        encoder.encode_embeddings(encoder.token_embeddings[ids(1, 11)], prefix=prefix)
