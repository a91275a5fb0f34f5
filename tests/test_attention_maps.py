import torch

from elite_tutorial.attention_maps import cross_attention_layers, record_cross_attention


def test_recorded_probabilities_reproduce_the_output_and_are_removed(tiny):
    unet = tiny.unet
    latents = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 77, 32)
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    with torch.no_grad():
        reference = unet(latents, 10, encoder_hidden_states=context).sample
        with record_cross_attention(unet) as maps:
            recorded = unet(latents, 10, encoder_hidden_states=context).sample
    torch.testing.assert_close(recorded, reference, rtol=1e-4, atol=1e-5)
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before
    assert sorted(maps) == sorted(cross_attention_layers(unet))
    for probs in (p for calls in maps.values() for p in calls):
        assert probs.shape[0] == 2 and probs.shape[-1] == 77
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
