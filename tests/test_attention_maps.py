"""Capturing cross-attention: what is recorded is what the layers computed, and nothing stays behind."""
from pathlib import Path

import pytest
import torch

from elite_tutorial.attention import ELITEAttnProcessor, elite_attention
from elite_tutorial.attention_maps import AttentionCapture, capture_cross_attention, cross_attention_layers, load_capture
from elite_tutorial.mappers import GlobalMapper


def unet_inputs(seed=0, batch=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=generator), torch.randn(batch, 77, 32, generator=generator)


def layer_inputs_and_outputs(unet):
    """Forward hooks recording each attn2 module's (hidden_states, context) and output, per call."""
    seen, handles = {}, []
    for name in cross_attention_layers(unet):
        module = unet.get_submodule(name.removesuffix(".processor"))

        def hook(module, args, kwargs, output, name=name):
            seen[name] = (args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"], output)
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return seen, handles


def test_captured_probabilities_times_values_give_what_each_layer_returned(tiny):
    unet = tiny.unet
    latents, context = unet_inputs()
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    with torch.no_grad():
        fused = unet(latents, 10, encoder_hidden_states=context).sample
        seen, handles = layer_inputs_and_outputs(unet)
        try:
            with capture_cross_attention(unet) as capture:
                explicit = unet(latents, 10, encoder_hidden_states=context).sample
        finally:
            for handle in handles:
                handle.remove()
    torch.testing.assert_close(explicit, fused, rtol=1e-4, atol=1e-5)
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before  # fused processors back
    assert sorted(capture.layers) == sorted(cross_attention_layers(unet)) and capture.timesteps == [10.0]
    for layer in capture.layers:
        attn = unet.get_submodule(layer.removesuffix(".processor"))
        probs = capture.probabilities(layer)  # (rows, heads, pixels, tokens)
        assert probs.shape[:2] == (2, attn.heads) and probs.shape[-1] == 77
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
        hidden, text, output = seen[layer]
        values = attn.to_v(text).view(2, 77, attn.heads, -1).transpose(1, 2)
        rebuilt = attn.to_out[0]((probs @ values).transpose(1, 2).flatten(2))
        torch.testing.assert_close(rebuilt, output, rtol=1e-4, atol=1e-5)
        height, width = capture.resolution(layer)
        assert height * width == probs.shape[2] and height == width


def test_capture_through_elite_processors_and_their_capture_is_restored(tiny):
    unet, mapper = tiny.unet, GlobalMapper.from_components(tiny)
    latents, context = unet_inputs(batch=1)
    with torch.no_grad(), elite_attention(unet, mapper):
        with capture_cross_attention(unet) as capture:
            unet(latents, 500, encoder_hidden_states=context)
        assert all(p.capture is None for p in unet.attn_processors.values() if isinstance(p, ELITEAttnProcessor))
        assert all(isinstance(unet.attn_processors[n], ELITEAttnProcessor) for n in cross_attention_layers(unet))
    assert sorted(capture.layers) == sorted(cross_attention_layers(unet))


def test_sum_over_steps_is_the_mean_of_the_kept_steps_and_steps_can_be_chosen(tiny):
    pipe = tiny.text_to_image_pipeline()
    pipe.set_progress_bar_config(disable=True)
    run = dict(num_inference_steps=3, guidance_scale=4.0, height=32, width=32, output_type="np")
    with capture_cross_attention(pipe, keep_steps=True) as capture:
        pipe("a red circle", generator=torch.Generator().manual_seed(0), **run)
    layer = capture.layers[-1]
    # one step per UNet call: PNDM's first step calls the UNet twice, so 3 steps make 4 calls
    assert capture.timesteps == pipe.scheduler.timesteps.tolist() and capture.num_steps == 4
    assert capture.guided and capture.conditional_rows == slice(1, 2)
    every = capture.probabilities(layer)
    torch.testing.assert_close(every, capture.probabilities(layer, steps=range(4)), rtol=2e-3, atol=2e-3)  # float16 steps
    late = capture.steps_between(high=capture.timesteps[3], low=0)
    assert late == [3]
    assert not torch.allclose(capture.probabilities(layer, late), every)
    summed_only = AttentionCapture()
    summed_only.record(layer, torch.rand(1, 1, 4, 77))
    with pytest.raises(ValueError, match="keep_steps"):
        summed_only.probabilities(layer, steps=[0])


def test_only_the_tokens_asked_for_are_kept(tiny):
    unet = tiny.unet
    latents, context = unet_inputs()
    with torch.no_grad():
        with capture_cross_attention(unet) as everything:
            unet(latents, 10, encoder_hidden_states=context)
        with capture_cross_attention(unet, tokens=[0, 5, 6]) as some:
            unet(latents, 10, encoder_hidden_states=context)
    layer = everything.layers[0]
    assert some.probabilities(layer).shape[-1] == 3 and some.column(5) == 1
    torch.testing.assert_close(some.probabilities(layer)[..., some.column(6)], everything.probabilities(layer)[..., 6])
    assert some.nbytes() * 77 == everything.nbytes() * 3
    with pytest.raises(ValueError, match="not captured"):
        some.column(7)


def test_a_capture_is_saved_and_loaded_whole(tiny, tmp_path):
    unet = tiny.unet
    latents, context = unet_inputs()
    with torch.no_grad(), capture_cross_attention(unet, keep_steps=True, tokens=[1, 2]) as capture:
        for t in (900, 100):
            unet(latents, t, encoder_hidden_states=context)
    loaded = load_capture(capture.save(tmp_path / "capture.safetensors"))
    assert (loaded.layers, loaded.timesteps, loaded.tokens, loaded.latent_size) == \
        (capture.layers, capture.timesteps, capture.tokens, capture.latent_size)
    for layer in capture.layers:
        torch.testing.assert_close(loaded.probabilities(layer), capture.probabilities(layer))
        torch.testing.assert_close(loaded.probabilities(layer, [1]), capture.probabilities(layer, [1]))
    (tmp_path / "other.safetensors").write_bytes(b"not a capture")
    with pytest.raises(Exception):
        load_capture(tmp_path / "other.safetensors")


def test_capture_refuses_what_has_no_unet():
    with pytest.raises(TypeError, match="UNet"):
        with capture_cross_attention(object()):
            pass


REFERENCES = Path(__file__).parent / "references"


def reference_captures() -> dict:
    """Two small generations on the tiny-random preset (half the default size, the prompt's first six
    tokens), captured with every step kept: ELITE's pipeline with the local branch (maps and gate),
    and the plain text-to-image pipeline (chapters 00 and 04)."""
    from elite_tutorial import load_components
    from elite_tutorial.mappers import LocalMapper
    from elite_tutorial.pipeline import ELITEPipeline

    torch.manual_seed(0)
    components = load_components("tiny-random", device="cpu")
    pipe = ELITEPipeline(components, GlobalMapper.from_components(components), LocalMapper.from_components(components))
    pipe.sd_pipeline.set_progress_bar_config(disable=True)
    image = torch.linspace(0, 1, 3 * 32 * 32).reshape(3, 32, 32)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[8:24, 8:24] = True
    concept = pipe.encode(image, mask)
    size = dict(height=components.unet.config.sample_size * pipe.sd_pipeline.vae_scale_factor // 2)
    size["width"] = size["height"]
    with capture_cross_attention(pipe, tokens=range(6), keep_steps=True) as elite_capture:
        pipe("a photo of a S", concept, num_inference_steps=2, local_scale=0.8, generator=torch.Generator().manual_seed(0),
             output_type="np", **size)
    plain_pipe = components.text_to_image_pipeline()
    plain_pipe.set_progress_bar_config(disable=True)
    with capture_cross_attention(plain_pipe, tokens=range(6), keep_steps=True) as plain_capture:
        plain_pipe("a photo of a circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                   **size)
    return {"elite": elite_capture, "plain": plain_capture}


def test_captured_maps_equal_the_saved_reference():
    """What a capture records, through ELITE's processors and through the capturing one, is pinned by
    files written with `python tests/test_attention_maps.py` (the processors' maths must not move)."""
    for name, capture in reference_captures().items():
        reference = load_capture(REFERENCES / f"capture_{name}.safetensors")
        assert capture.layers == reference.layers and capture.timesteps == reference.timesteps
        assert bool(capture.gate_sums) == (name == "elite")
        # the kept steps are float16: a thread count that moves a float32 sum in its last bits can move
        # a float16 step by one unit in its last place (2^-11 of its size), so they get that tolerance
        for recorded, pinned, rtol in ((capture.sums, reference.sums, 1e-4), (capture.gate_sums, reference.gate_sums, 1e-4),
                                       (capture.steps, reference.steps, 2**-10), (capture.gate_steps, reference.gate_steps, 2**-10)):
            assert recorded.keys() == pinned.keys()
            for layer in recorded:
                torch.testing.assert_close(recorded[layer], pinned[layer], atol=1e-5, rtol=rtol)


if __name__ == "__main__":
    REFERENCES.mkdir(exist_ok=True)
    for name, capture in reference_captures().items():
        print("wrote", capture.save(REFERENCES / f"capture_{name}.safetensors"))
