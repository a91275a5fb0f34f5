"""LocalMapper and ELITE's local attention branch: the authors' maths and checkpoint format, masks,
λ = 0, classifier-free guidance rows, and per-sample gate normalisation."""
import numpy as np
import pytest
import torch
from test_global_mapper import AuthorsMapper, authors_checkpoint
from torch import nn

from elite_tutorial.attention import LocalTokens, elite_attention, set_local_tokens
from elite_tutorial.attention_maps import AttentionCapture, capture_cross_attention
from elite_tutorial.data import concept_folder
from elite_tutorial.mappers import GlobalMapper, LocalMapper, clip_feature_levels, mask_local_tokens


class AuthorsMapperLocal(AuthorsMapper):
    """An independent restatement of the authors' `MapperLocal` (train_local.py): their `Mapper`'s
    modules, with the class-token mapping broadcast to every patch and the mean over levels."""

    def forward(self, embs):
        hidden_states = ()
        for i, emb in enumerate(embs):
            hidden_state = getattr(self, f"mapping_{i}")(emb[:, :1]) + getattr(self, f"mapping_patch_{i}")(emb[:, 1:])
            hidden_states += (hidden_state.unsqueeze(0),)
        return torch.cat(hidden_states, dim=0).mean(dim=0)


def with_kv_copies(mapper, unet):
    """Random k/v copies added under the authors' names (so equality is no accident of copied weights)."""
    for name, module in unet.named_modules():
        if type(module).__name__ == "Attention" and "attn2" in name:
            for which in ("to_k", "to_v"):
                shape = getattr(module, which).weight.shape
                mapper.add_module(f'{name.replace(".", "_")}_{which}', nn.Linear(shape[1], shape[0], bias=False))
    return mapper


class AuthorsCrossAttention:
    """The authors' `inj_forward_crossattention` (train_local.py) as a processor, unbatched guidance:
    heads folded into the batch, the w0 map normalised by one max over the whole call."""

    def __init__(self, global_kv, local_kv, local=None, index=None, lam=1.0):
        (self.to_k_global, self.to_v_global), (self.to_k_local, self.to_v_local) = global_kv, local_kv
        self.local, self.index, self.lam = local, index, lam

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(self.to_k_global(encoder_hidden_states))
        value = attn.head_to_batch_dim(self.to_v_global(encoder_hidden_states))
        attention_probs = (torch.matmul(query, key.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
        hidden = torch.matmul(attention_probs, value)
        if self.local is not None:
            key_local = attn.head_to_batch_dim(self.to_k_local(self.local))
            value_local = attn.head_to_batch_dim(self.to_v_local(self.local))
            probs_local = (torch.matmul(query, key_local.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
            index = self.index.reshape(-1, 1).repeat((1, attn.heads)).reshape(-1)
            mask = attention_probs.clone().permute((0, 2, 1))[torch.arange(index.shape[0]), index]
            mask = mask.unsqueeze(2) / mask.max()
            hidden = hidden + torch.matmul(probs_local * mask * self.lam, value_local)
        hidden = attn.batch_to_head_dim(hidden)
        return attn.to_out[1](attn.to_out[0](hidden))


def authors_unet_output(unet, global_authors, local_authors, latents, t, context, local=None, index=None, lam=1.0):
    previous = unet.attn_processors
    processors = dict(previous)
    for name in processors:
        if "attn2" in name:
            key = name.removesuffix(".processor").replace(".", "_")
            processors[name] = AuthorsCrossAttention(
                (getattr(global_authors, f"{key}_to_k"), getattr(global_authors, f"{key}_to_v")),
                (getattr(local_authors, f"{key}_to_k"), getattr(local_authors, f"{key}_to_v")), local, index, lam)
    unet.set_attn_processor(processors)
    try:
        return unet(latents, t, encoder_hidden_states=context).sample
    finally:
        unet.set_attn_processor(previous)


@pytest.fixture
def mappers(tiny):
    """(authors' global, authors' local, our global, our local), the same random weights."""
    global_authors = authors_checkpoint(tiny)
    local_authors = with_kv_copies(AuthorsMapperLocal(32, 32, hidden=48), tiny.unet)
    return (global_authors, local_authors, GlobalMapper.from_official(global_authors.state_dict(), tiny),
            LocalMapper.from_official(local_authors.state_dict(), tiny))


def test_official_local_mapper_loads_and_computes_what_the_authors_code_computes(tiny, mappers, tmp_path):
    _, local_authors, _, _ = mappers
    path = tmp_path / "local_mapper.pt"
    torch.save(local_authors.state_dict(), path)
    ours = LocalMapper.from_official(path, tiny)
    levels = clip_feature_levels(tiny.image_encoder, torch.randn(2, 3, 32, 32))
    patches = levels[0].shape[1] - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(levels), local_authors(levels), rtol=0, atol=0)
    assert ours(levels).shape == (2, patches, 32)
    round_trip = with_kv_copies(AuthorsMapperLocal(32, 32, hidden=48), tiny.unet)
    round_trip.load_state_dict(ours.official_state_dict())
    assert all(torch.equal(a, b) for a, b in zip(round_trip.state_dict().values(), local_authors.state_dict().values()))


def local_inputs(tiny, local_mapper, batch=1):
    levels = clip_feature_levels(tiny.image_encoder, torch.randn(batch, 3, 32, 32))
    mask = torch.zeros(batch, 1, 32, 32)
    mask[:, :, 8:24, 4:20] = 1
    with torch.no_grad():
        return mask_local_tokens(local_mapper(levels), mask)


def test_local_branch_equals_the_authors_attention_for_one_image(tiny, mappers):
    global_authors, local_authors, ours_global, ours_local = mappers
    tokens = local_inputs(tiny, ours_local)
    latents, t, context = torch.randn(1, 4, 16, 16), torch.tensor([300]), torch.randn(1, 77, 32)
    index = torch.tensor([5])
    with torch.no_grad():
        expected = authors_unet_output(tiny.unet, global_authors, local_authors, latents, t, context, tokens, index, 0.8)
        local = LocalTokens(tokens, rows=torch.tensor([0]), primary_index=index, scale=0.8)
        with elite_attention(tiny.unet, ours_global, local_mapper=ours_local, local=local):
            ours = tiny.unet(latents, t, encoder_hidden_states=context).sample
        global_only = authors_unet_output(tiny.unet, global_authors, local_authors, latents, t, context)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - global_only).abs().max() > 1e-3  # the local branch did something


def test_lambda_zero_is_exactly_global_only_and_unconditional_rows_get_no_local_term(tiny, mappers):
    _, _, ours_global, ours_local = mappers
    tokens = local_inputs(tiny, ours_local)
    latents, t = torch.randn(2, 4, 16, 16), torch.tensor([300, 300])
    context = torch.randn(2, 77, 32)  # row 0: "unconditional", row 1: the prompt
    with torch.no_grad(), elite_attention(tiny.unet, ours_global, local_mapper=ours_local) as unet:
        global_only = unet(latents, t, encoder_hidden_states=context).sample
        set_local_tokens(unet, LocalTokens(tokens, torch.tensor([1]), torch.tensor([5]), scale=0.0))
        assert torch.equal(unet(latents, t, encoder_hidden_states=context).sample, global_only)
        set_local_tokens(unet, LocalTokens(tokens, torch.tensor([1]), torch.tensor([5]), scale=0.8))
        both = unet(latents, t, encoder_hidden_states=context).sample
    assert torch.equal(both[0], global_only[0])
    assert (both[1] - global_only[1]).abs().max() > 1e-3


def test_gate_is_normalised_per_sample_so_batching_changes_nothing(tiny, mappers):
    _, _, ours_global, ours_local = mappers
    tokens = local_inputs(tiny, ours_local, batch=2)
    latents, t, context = torch.randn(2, 4, 16, 16), torch.tensor([300, 700]), torch.randn(2, 77, 32)
    context[1] *= 3  # very different attention maps, so one max over the batch would differ
    index = torch.tensor([5, 2])
    capture = AttentionCapture()
    with torch.no_grad(), elite_attention(tiny.unet, ours_global, local_mapper=ours_local) as unet:
        set_local_tokens(unet, LocalTokens(tokens, torch.tensor([0, 1]), index, 0.8, capture=capture))
        batched = unet(latents, t, encoder_hidden_states=context).sample
        for i in range(2):
            set_local_tokens(unet, LocalTokens(tokens[i:i + 1], torch.tensor([0]), index[i:i + 1], 0.8))
            alone = unet(latents[i:i + 1], t[i:i + 1], encoder_hidden_states=context[i:i + 1]).sample
            torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    assert len(capture.gate_sums) == 4
    gate = capture.gate(next(iter(capture.gate_sums)))  # (rows, heads, pixels)
    assert gate.shape[0] == 2 and gate.shape[2] == 16 * 16 and 0 <= gate.min()
    torch.testing.assert_close(gate.amax(dim=(1, 2)), torch.ones(2))  # each sample's own maximum is 1


def test_mask_is_resized_to_the_patch_grid_by_nearest_neighbour():
    tokens = torch.ones(1, 16, 3)
    mask = torch.zeros(1, 64, 64)
    mask[:, :32, :] = 1  # top half
    masked = mask_local_tokens(tokens, mask)
    assert masked[0, :8].eq(1).all() and masked[0, 8:].eq(0).all()
    with pytest.raises(ValueError, match="square"):
        mask_local_tokens(torch.ones(1, 15, 3), mask)


def test_local_tokens_without_a_local_mapper_are_refused(tiny, mappers):
    _, _, ours_global, ours_local = mappers
    tokens = local_inputs(tiny, ours_local)
    local = LocalTokens(tokens, torch.tensor([0]), torch.tensor([5]))
    with elite_attention(tiny.unet, ours_global, local=local), pytest.raises(ValueError, match="no LocalMapper"):
        tiny.unet(torch.randn(1, 4, 16, 16), 10, encoder_hidden_states=torch.randn(1, 77, 32))
    with pytest.raises(ValueError, match="must match"):
        LocalTokens(tokens, torch.tensor([0, 1]), torch.tensor([5]))


def test_local_mapper_save_pretrained_round_trip(tiny, tmp_path):
    mapper = LocalMapper.from_components(tiny)
    mapper.save_pretrained(tmp_path / "local")
    saved, loaded = mapper.state_dict(), LocalMapper.from_pretrained(tmp_path / "local").state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert any(k.startswith("to_k_local.") for k in saved)


# --------------------------------------------------------------------------------------------------
# In the pipeline.

@pytest.fixture(scope="module")
def local_pipe(tiny):
    from elite_tutorial.pipeline import ELITEPipeline
    torch.manual_seed(0)
    return ELITEPipeline(tiny, GlobalMapper.from_components(tiny), LocalMapper.from_components(tiny))


def object_and_mask():
    import numpy as np
    from PIL import Image
    pixels = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    mask = np.zeros((20, 24), np.uint8)  # another size than the image: resized to it
    mask[4:14, 2:12] = 255
    return Image.fromarray(pixels), Image.fromarray(mask)


def test_encode_reads_the_object_alone_into_masked_local_tokens(local_pipe):
    image, mask = object_and_mask()
    with pytest.warns(UserWarning, match="resized to the image"):
        concept = local_pipe.encode(image, mask)
    assert concept.local_tokens.shape == (64, 32)  # the tiny encoder's 8 x 8 patches
    kept = concept.local_tokens.abs().sum(-1) > 0
    assert 0 < kept.sum() < 64  # background patches are zero vectors
    with pytest.warns(UserWarning, match="whole image"):
        unmasked = local_pipe.encode(image)
    assert (unmasked.local_tokens.abs().sum(-1) > 0).all()
    torch.testing.assert_close(unmasked.words, concept.words)  # the words read the whole image either way


def test_pipeline_local_scale_zero_is_global_only_and_guidance_rows_are_right(tiny, local_pipe):
    from elite_tutorial.pipeline import ELITEPipeline
    image, mask = object_and_mask()
    concept = local_pipe.encode(image, mask)
    global_only = ELITEPipeline(tiny, local_pipe.global_mapper)
    common = dict(num_inference_steps=2, output_type="np", height=32, width=32, num_images_per_prompt=2)

    def run(pipe, **kw):
        return pipe(["a photo of a S", "S on the left"], [concept, concept], generator=torch.Generator().manual_seed(1),
                    **common, **kw).images

    plain = run(global_only)
    assert np.array_equal(run(local_pipe, local_scale=0.0), plain)
    with capture_cross_attention(local_pipe) as capture:
        with_local = run(local_pipe)
    assert with_local.shape == plain.shape and np.abs(with_local - plain).max() > 1e-4
    assert capture.guided and capture.num_steps == len(local_pipe.sd_pipeline.scheduler.timesteps)
    layer = capture.layers[0]
    assert capture.gate(layer).shape[0] == 4  # 2 prompts x 2 images: the conditional rows only
    assert capture.probabilities(layer).shape[0] == 8  # [unconditional; conditional] rows
    assert local_pipe.attention_capture is None
    with pytest.raises(ValueError, match="no local tokens"):
        local_pipe("a photo of a S", global_only.encode(image), num_inference_steps=1, output_type="np", height=32, width=32)


def test_encode_takes_masks_as_the_authors_store_them_and_refuses_bad_ones(local_pipe, tmp_path):
    import warnings

    import numpy as np
    from PIL import Image
    pixels = np.zeros((30, 50, 3), np.uint8)  # non-square
    pixels[5:25, 10:30] = (200, 30, 30)
    mask = np.zeros((30, 50, 3), np.uint8)  # an RGB mask, white on the object
    mask[5:25, 10:30] = 255
    Image.fromarray(pixels).save(tmp_path / "0.jpg")
    Image.fromarray(mask).save(tmp_path / "0_bg.png")
    (image_path, mask_path), = concept_folder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same size: no note
        concept = local_pipe.encode(image_path, mask_path)
    assert concept.mask.shape == (32, 32) and concept.mask[16, 16] and not concept.mask[16, 31]
    grey = Image.fromarray(mask).convert("L")
    torch.testing.assert_close(local_pipe.encode(image_path, grey).local_tokens, concept.local_tokens)
    with pytest.raises(ValueError, match="empty"):
        local_pipe.encode(image_path, Image.new("L", (50, 30), 0))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="not a readable mask"):
        local_pipe.encode(image_path, tmp_path / "text.png")
