"""Contracts shared with transformers' Llava, each checked on `LlavaForConditionalGeneration` doing the same."""

import inspect

import pytest
import torch
from conftest import IMAGE_SIZE, IMAGE_TOKEN_ID, image_prompt, tiny_model
from transformers import CompileConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaModel

from hf_vlm import VLMForConditionalGeneration, VLMModel


def pair():
    """Our mlp model over CLIP and Llama, and a Llava with the same weights: (ours, llava, input_ids, pixel_values)."""
    ours = tiny_model("clip", projector_type="mlp", vision_feature_layer=-2)
    config = ours.config
    llava_config = LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=config.image_seq_length,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    llava = LlavaForConditionalGeneration(llava_config).eval()
    llava.load_state_dict(ours.state_dict(), strict=True)
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    return ours, llava, torch.tensor([image_prompt(config)]), pixels


def test_logits_match_llava_with_copied_weights():
    """With the mlp projector and Llava's weights copied in (same keys, no map), logits equal Llava's."""
    ours, llava, ids, pixels = pair()
    with torch.no_grad():
        diff = (
            ours(input_ids=ids, pixel_values=pixels).logits - llava(input_ids=ids, pixel_values=pixels).logits
        ).abs()
    assert diff.max() < 1e-5


@pytest.mark.parametrize("head", [True, False], ids=["for_conditional_generation", "base_model"])
def test_return_dict_false_gives_the_tuple_llava_gives(head):
    """forward(return_dict=False), or config.return_dict=False, gives a tuple whose first entry equals Llava's."""
    ours, llava, ids, pixels = pair()
    if not head:
        ours, llava = ours.model, llava.model
    with torch.no_grad():
        expected = llava(input_ids=ids, pixel_values=pixels, return_dict=False)
        got = ours(input_ids=ids, pixel_values=pixels, return_dict=False)
        # config.return_dict=False too; Llava's head fails on that (its inner call returns a tuple), ours does not.
        ours.config.return_dict = False
        from_config = ours(input_ids=ids, pixel_values=pixels)
    assert type(got) is type(expected) is type(from_config) is tuple
    assert len(got) == len(expected)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)  # logits, or the last hidden state
    torch.testing.assert_close(from_config[0], expected[0], atol=1e-5, rtol=0)


def test_forward_returns_the_image_outputs_as_llava():
    """forward's output carries the image encoder's outputs (`image_outputs`), with Llava's image tokens."""
    ours, llava, ids, pixels = pair()
    with torch.no_grad():
        got, expected = ours(input_ids=ids, pixel_values=pixels), llava(input_ids=ids, pixel_values=pixels)
    torch.testing.assert_close(
        got.image_outputs.pooler_output, expected.image_outputs.pooler_output, atol=1e-6, rtol=0
    )


def test_get_image_features_honours_output_options_as_llava():
    """get_image_features passes the tower's hidden states and attentions through when asked, and takes return_dict."""
    ours, llava, _, pixels = pair()
    ours.set_attn_implementation("eager")
    llava.set_attn_implementation("eager")
    with torch.no_grad():
        got = ours.get_image_features(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        expected = llava.get_image_features(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        plain = ours.get_image_features(pixel_values=pixels)
        as_tuples = (
            ours.get_image_features(pixel_values=pixels, return_dict=False),
            llava.get_image_features(pixel_values=pixels, return_dict=False),
        )
    num_layers = ours.config.vision_config.num_hidden_layers
    assert len(got.hidden_states) == len(expected.hidden_states) == num_layers + 1
    assert len(got.attentions) == len(expected.attentions) == num_layers
    for ours_states, llava_states in zip(  # noqa: B905 (lengths checked above)
        got.hidden_states + got.attentions, expected.hidden_states + expected.attentions
    ):
        torch.testing.assert_close(ours_states, llava_states, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-6, rtol=0)
    # Not asked for: the layers taken for the projector stay inside, and the image tokens are the same.
    assert plain.hidden_states is None and plain.attentions is None
    torch.testing.assert_close(plain.pooler_output, got.pooler_output, atol=0, rtol=0)
    assert all(isinstance(output, tuple) for output in as_tuples)


def test_config_output_hidden_states_reaches_the_tower():
    """The vision config's output_hidden_states on: get_image_features returns the tower's hidden states, as Llava."""
    ours, llava, _, pixels = pair()
    for model in (ours, llava):
        model.config.vision_config.output_hidden_states = True
    with torch.no_grad():
        got, expected = ours.get_image_features(pixel_values=pixels), llava.get_image_features(pixel_values=pixels)
    assert len(got.hidden_states) == len(expected.hidden_states) == ours.config.vision_config.num_hidden_layers + 1


@pytest.mark.parametrize(
    ("ours", "llava"), [(VLMForConditionalGeneration, LlavaForConditionalGeneration), (VLMModel, LlavaModel)]
)
@pytest.mark.parametrize("method", ["forward", "get_image_features"])
def test_kwargs_are_typed_as_llava(ours, llava, method):
    """**kwargs is annotated as Llava's (Unpack[TransformersKwargs]), so introspection sees output_attentions & co."""
    ours_kwargs = inspect.signature(getattr(ours, method)).parameters["kwargs"].annotation
    llava_kwargs = inspect.signature(getattr(llava, method)).parameters["kwargs"].annotation
    assert ours_kwargs == llava_kwargs
    typed = ours_kwargs.__args__[0].__annotations__
    assert {"output_attentions", "output_hidden_states", "num_items_in_batch"} <= set(typed)


def test_fullgraph_compile_flag_and_compiled_forward_as_llava():
    """_can_compile_fullgraph is declared as Llava's; forward with images compiles (fullgraph) to eager's logits."""
    ours, llava, ids, pixels = pair()
    assert (
        VLMForConditionalGeneration._can_compile_fullgraph
        is LlavaForConditionalGeneration._can_compile_fullgraph
        is True
    )
    for model in (ours, llava):
        with torch.no_grad():
            eager = model(input_ids=ids, pixel_values=pixels).logits  # also installs the hidden-state hooks, outside
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="eager", fullgraph=True)(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)


def test_static_cache_and_compiled_decoding_give_the_greedy_tokens_of_llava():
    """Greedy generate with a static cache, and with compiled fullgraph decoding steps, gives Llava's tokens."""
    ours, llava, ids, pixels = pair()
    graphs = []

    def backend(graph, example_inputs, **options):  # records the graphs, runs them eagerly
        graphs.append(graph)
        return graph.forward

    compile_config = CompileConfig(fullgraph=True, backend=backend)
    compile_config._compile_all_devices = True  # generate compiles on accelerators only, unless told
    options = dict(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    expected = llava.generate(**options)
    torch._dynamo.reset()
    for extra in (
        {},
        {"cache_implementation": "static"},
        {"cache_implementation": "static", "compile_config": compile_config},
    ):
        assert torch.equal(ours.generate(**options, **extra), expected), extra
    assert graphs, "the decoding steps were not compiled"


def test_4d_attention_mask_gives_the_2d_mask_logits_as_llava():
    """A 4D causal mask (boolean or additive) gives the logits of the 2D all-ones mask, for ours as for Llava."""
    ours, llava, ids, pixels = pair()
    length = ids.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))[None, None]  # (1, 1, T, T)
    additive = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    for model in (ours, llava):
        with torch.no_grad():
            flat = model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids)).logits
            for mask in (causal, additive):
                torch.testing.assert_close(
                    model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits, flat, atol=1e-5, rtol=0
                )


def test_pixel_values_beside_mm_encoder_outputs_raise_as_llava():
    """pixel_values with mm_encoder_outputs raise in forward (even an empty dict) and generate, as Llava."""
    ours, llava, ids, pixels = pair()
    for model in (ours, llava):
        encoded = {"image": model.get_image_features(pixel_values=pixels, return_dict=True)}
        for mm_encoder_outputs in (encoded, {}):
            with pytest.raises(ValueError):
                model(input_ids=ids, pixel_values=pixels, mm_encoder_outputs=mm_encoder_outputs)
        with pytest.raises(ValueError):
            model.generate(input_ids=ids, pixel_values=pixels, mm_encoder_outputs=encoded, max_new_tokens=2)
        # Either alone works.
        assert model(input_ids=ids, mm_encoder_outputs=encoded).logits.shape[1] == ids.shape[1]
    with pytest.raises(ValueError, match="Images came twice, as pixel_values and mm_encoder_outputs"):
        ours.generate(input_ids=ids, pixel_values=pixels, mm_encoder_outputs=encoded, max_new_tokens=2)
