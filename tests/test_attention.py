"""ELITE's attention processors: installed by name, removable, idempotent, and only on text context."""
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from elite_tutorial.attention import ELITEAttnProcessor, elite_attention, install_elite_attention, local_gate, remove_elite_attention
from elite_tutorial.attention_maps import AttentionCapture, cross_attention_layers
from elite_tutorial.mappers import GlobalMapper


def kinds(unet):
    return {name: type(p).__name__ for name, p in unet.attn_processors.items()}


def unet_output(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([400]), encoder_hidden_states=context).sample


def test_install_twice_does_not_stack_and_removal_restores(tiny):
    unet, mapper = tiny.unet, GlobalMapper.from_components(tiny)
    before = kinds(unet)
    install_elite_attention(unet, mapper)
    install_elite_attention(unet, mapper)
    try:
        processors = unet.attn_processors
        cross = cross_attention_layers(unet)
        assert len(cross) == 4
        for name, processor in processors.items():
            if name in cross:
                assert isinstance(processor, ELITEAttnProcessor)
                assert not isinstance(processor.replaced, ELITEAttnProcessor)  # not stacked
            else:  # self-attention keeps its own processor and its own k/v
                assert type(processor).__name__ == before[name]
    finally:
        remove_elite_attention(unet)
    assert kinds(unet) == before
    remove_elite_attention(unet)  # removing again is harmless
    assert kinds(unet) == before


def test_context_manager_restores_the_exact_previous_processors_even_on_error(tiny):
    unet, mapper = tiny.unet, GlobalMapper.from_components(tiny)
    previous = unet.attn_processors
    try:
        with elite_attention(unet, mapper):
            assert all(isinstance(unet.attn_processors[n], ELITEAttnProcessor) for n in cross_attention_layers(unet))
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all(unet.attn_processors[n] is p for n, p in previous.items())


def test_kv_copies_are_used_for_the_text_context_and_nothing_else(tiny):
    unet, mapper = tiny.unet, GlobalMapper.from_components(tiny)
    own = {n: (m.to_k.weight.clone(), m.to_v.weight.clone()) for n, m in unet.named_modules() if n.endswith("attn")}
    plain = unet_output(unet)
    with torch.no_grad():
        for layer in mapper.attention_layers:
            mapper.to_v_global[layer].weight.mul_(0.5)
    with elite_attention(unet, mapper):
        changed = unet_output(unet)
    assert (changed - plain).abs().max() > 1e-3  # the copies are what cross-attention reads
    # the UNet's own weights (self- and cross-attention) are untouched
    assert all(torch.equal(m.to_k.weight, own[n][0]) and torch.equal(m.to_v.weight, own[n][1])
               for n, m in unet.named_modules() if n in own)
    torch.testing.assert_close(unet_output(unet), plain, rtol=0, atol=0)


def test_gradients_reach_the_copies_not_the_unet(tiny):
    unet, mapper = tiny.unet, GlobalMapper.from_components(tiny)
    mapper.requires_grad_(True)
    context = torch.randn(1, 77, 32)
    with elite_attention(unet, mapper):
        unet(torch.randn(1, 4, 16, 16), torch.tensor([100]), encoder_hidden_states=context).sample.square().mean().backward()
    assert all(mapper.to_k_global[k].weight.grad.abs().sum() > 0 for k in mapper.attention_layers)
    assert all(p.grad is None for p in unet.parameters())


def test_default_processor_is_the_fused_one(tiny):
    # what ELITE's processor replaces and restores is diffusers' fused SDPA path
    assert all(isinstance(tiny.unet.attn_processors[n], AttnProcessor2_0) for n in cross_attention_layers(tiny.unet))


def test_capture_records_the_probabilities_without_changing_the_output(tiny):
    unet, mapper = tiny.unet, GlobalMapper.from_components(tiny)
    with torch.no_grad():
        for layer in mapper.attention_layers:
            mapper.to_k_global[layer].weight.mul_(1.5)  # copies that differ from the UNet's own
    with elite_attention(unet, mapper):
        fused = unet_output(unet)
    capture = AttentionCapture()
    with elite_attention(unet, mapper, capture=capture):
        explicit = unet_output(unet)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)
    assert sorted(capture.layers) == sorted(cross_attention_layers(unet))
    for layer in capture.layers:
        probs = capture.probabilities(layer)  # (rows, heads, pixels, tokens)
        assert capture.calls[layer] == 1 and probs.shape[0] == 1 and probs.shape[-1] == 77
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))  # rows are distributions


def test_local_gate_is_w0s_column_over_each_samples_own_maximum():
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 2, 5, 7, generator=generator).softmax(-1) * torch.tensor([1.0, 2.0, 4.0]).view(-1, 1, 1, 1)
    primary_index = torch.tensor([1, 4, 6])
    gate = local_gate(probs, primary_index)
    assert gate.shape == (3, 2, 5, 1)
    for row in range(3):
        column = probs[row, :, :, primary_index[row]]  # (heads, pixels)
        torch.testing.assert_close(gate[row, ..., 0], column / column.max())
        assert torch.equal(local_gate(probs[row:row + 1], primary_index[row:row + 1]), gate[row:row + 1])  # batching changes nothing
