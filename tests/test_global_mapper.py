"""GlobalMapper: the authors' maths and checkpoint format, our save format, and clear refusals."""
import copy
import os
from fractions import Fraction

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from elite_tutorial.attention import elite_attention
from elite_tutorial.mappers import GlobalMapper, clip_feature_levels


class AuthorsMapper(nn.Module):
    """An independent restatement of the authors' `Mapper` (train_global.py), with their module names.
    Their hidden width is 1024; here it is a parameter so the test runs on tiny sizes."""

    def __init__(self, input_dim, output_dim, hidden=1024):
        super().__init__()
        for i in range(5):
            for name in (f"mapping_{i}", f"mapping_patch_{i}"):
                setattr(self, name, nn.Sequential(nn.Linear(input_dim, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                                                  nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                                                  nn.Linear(hidden, output_dim)))

    def forward(self, embs):
        hidden_states = ()
        for i, emb in enumerate(embs):
            hidden_state = (getattr(self, f"mapping_{i}")(emb[:, :1])
                            + getattr(self, f"mapping_patch_{i}")(emb[:, 1:]).mean(dim=1, keepdim=True))
            hidden_states += (hidden_state,)
        return torch.cat(hidden_states, dim=1)


def authors_checkpoint(components, hidden=48):
    """The authors' mapper for these components, k/v copies added the way their training script does
    (random weights, so equality below is not a coincidence of copied UNet weights)."""
    mapper = AuthorsMapper(components.image_encoder.config.hidden_size, components.text_encoder.config.hidden_size, hidden)
    for name, module in components.unet.named_modules():
        if type(module).__name__ == "Attention" and "attn2" in name:
            for which in ("to_k", "to_v"):
                shape = getattr(module, which).weight.shape
                mapper.add_module(f'{name.replace(".", "_")}_{which}', nn.Linear(shape[1], shape[0], bias=False))
    return mapper


def test_official_checkpoint_loads_and_computes_what_the_authors_code_computes(tiny, tmp_path):
    authors = authors_checkpoint(tiny)
    path = tmp_path / "global_mapper.pt"
    torch.save(authors.state_dict(), path)
    ours = GlobalMapper.from_official(path, tiny)
    assert ours.hidden_width == 48 and len(ours.attention_layers) == 4

    levels = clip_feature_levels(tiny.image_encoder, torch.randn(3, 3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(levels), authors(levels), rtol=0, atol=0)
    assert ours(levels).shape == (3, 5, tiny.text_encoder.config.hidden_size)

    # the k/v copies: the UNet with ELITE's processors == the UNet whose attn2 k/v *are* the copies
    latents, t, context = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    reference = copy.deepcopy(tiny.unet)
    for name, module in reference.named_modules():
        if name.endswith("attn2"):
            module.to_k.weight.data = getattr(authors, f'{name.replace(".", "_")}_to_k').weight.data.clone()
            module.to_v.weight.data = getattr(authors, f'{name.replace(".", "_")}_to_v').weight.data.clone()
    with torch.no_grad(), elite_attention(tiny.unet, ours):
        elite = tiny.unet(latents, t, encoder_hidden_states=context).sample
    expected = reference(latents, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(elite, expected, rtol=1e-5, atol=1e-5)

    # and back: our weights under the authors' names load into their module unchanged
    round_trip = authors_checkpoint(tiny)
    round_trip.load_state_dict(ours.official_state_dict())
    assert all(torch.equal(a, b) for a, b in zip(round_trip.state_dict().values(), authors.state_dict().values()))


def test_fresh_mapper_is_sized_from_the_components_and_copies_the_unet_kv(tiny):
    mapper = GlobalMapper.from_components(tiny)
    assert (mapper.vision_width, mapper.text_width, mapper.hidden_width) == (32, 32, 32)
    for name, module in tiny.unet.named_modules():
        if name.endswith("attn2"):
            to_k, to_v = mapper.key_value(name)
            assert torch.equal(to_k.weight, module.to_k.weight) and torch.equal(to_v.weight, module.to_v.weight)
            assert to_k.weight.data_ptr() != module.to_k.weight.data_ptr()  # a copy, not the UNet's own
    # with copies equal to the UNet's own, ELITE's attention changes nothing
    latents, t, context = torch.randn(1, 4, 16, 16), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        plain = tiny.unet(latents, t, encoder_hidden_states=context).sample
        with elite_attention(tiny.unet, mapper):
            elite = tiny.unet(latents, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(elite, plain, rtol=1e-5, atol=1e-5)


def test_save_pretrained_round_trip_in_safetensors(tiny, tmp_path):
    mapper = GlobalMapper.from_components(tiny)
    torch.nn.init.normal_(mapper.mapping[2][0].weight)
    mapper.save_pretrained(tmp_path / "mapper")
    assert sorted(p.name for p in (tmp_path / "mapper").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = GlobalMapper.from_pretrained(tmp_path / "mapper")
    assert loaded.attention_layers == mapper.attention_layers
    saved, reloaded = mapper.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)
    mapper.save_pretrained(tmp_path / "mapper")  # overwriting is allowed and leaves no staging folders
    assert sorted(os.listdir(tmp_path)) == ["mapper"]
    # a folder whose weights do not match its config is an error, not a half-loaded mapper
    weights = load_file(tmp_path / "mapper" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("to_v_global")}, tmp_path / "mapper" / "model.safetensors")
    with pytest.raises(RuntimeError, match="Missing key"):
        GlobalMapper.from_pretrained(tmp_path / "mapper")


def test_a_mapper_for_other_components_is_refused_with_expected_and_found(tiny):
    wrong = GlobalMapper(vision_width=64, text_width=32, hidden_width=16, attention_layers={"mid_block_attn2": [32, 32]})
    with pytest.raises(ValueError, match=r"vision width: the components have 32, the mapper 64") as error:
        wrong.check_compatible(tiny)
    assert "cross-attention layers: the UNet has 4" in str(error.value)


def test_official_checkpoint_of_the_wrong_size_is_refused(tiny, tmp_path):
    other = AuthorsMapper(input_dim=16, output_dim=32, hidden=8)  # a vision width these components lack
    path = tmp_path / "global_mapper.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(ValueError, match="vision width: the components have 32, the mapper 16"):
        GlobalMapper.from_official(path, tiny)


def test_truncated_and_non_checkpoint_files_are_refused(tiny, tmp_path):
    path = tmp_path / "global_mapper.pt"
    torch.save(authors_checkpoint(tiny).state_dict(), path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        GlobalMapper.from_official(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        GlobalMapper.from_official(text)
    with pytest.raises(FileNotFoundError):
        GlobalMapper.from_official(tmp_path / "missing.pt")
    local = {"mapping_0.0.weight": torch.zeros(2, 2), "local_0.0.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="unexpected keys"):
        GlobalMapper.from_official(local)
    incomplete = {k: v for k, v in authors_checkpoint(tiny).state_dict().items() if not k.startswith("mapping_patch_3")}
    with pytest.raises(ValueError, match="missing"):
        GlobalMapper.from_official(incomplete)


def test_a_pickle_with_objects_is_not_unpickled(tmp_path):
    path = tmp_path / "global_mapper.pt"
    torch.save({"mapping_0.0.weight": torch.zeros(2, 2), "note": Fraction(1, 3)}, path)
    with pytest.raises(ValueError, match="objects other than tensors"):
        GlobalMapper.from_official(path)
