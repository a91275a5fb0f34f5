"""ELITEPipeline on the tiny random components: encode, select words, generate, refuse bad input."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from elite_tutorial.attention_maps import cross_attention_layers
from elite_tutorial.data import clip_pixels, object_crop
from elite_tutorial.mappers import GlobalMapper, clip_feature_levels
from elite_tutorial.pipeline import ELITEPipeline
from elite_tutorial.words import encode_prompts_with_words


@pytest.fixture(scope="module")
def pipe(tiny):
    torch.manual_seed(0)
    return ELITEPipeline(tiny, GlobalMapper.from_components(tiny))


def picture(mode="RGB", size=(48, 32)):
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def test_encode_reads_any_image_into_five_words(pipe, tmp_path):
    concept = pipe.encode(picture())
    assert concept.words.shape == (5, 32) and concept.pixel_values.shape == (3, 32, 32)
    for mode in ("L", "RGBA", "P", "CMYK"):
        assert pipe.encode(picture(mode)).words.shape == (5, 32)
    grey = picture("L")
    torch.testing.assert_close(pipe.encode(grey).words, pipe.encode(grey.convert("RGB")).words)
    sixteen = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    torch.testing.assert_close(pipe.encode(sixteen).words, pipe.encode(grey).words, rtol=1e-4, atol=1e-4)
    path = tmp_path / "x.png"
    picture().save(path)
    mask = np.zeros((32, 48), np.uint8)
    mask[8:24, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "x_bg.png")
    with_mask = pipe.encode(path, tmp_path / "x_bg.png")
    assert with_mask.mask.shape == (32, 32) and with_mask.mask.dtype == torch.bool and with_mask.mask.any()
    torch.testing.assert_close(with_mask.words, pipe.encode(path).words)  # global words read the whole image


def test_a_mapper_trained_on_the_object_alone_reads_the_object_cut_out_by_the_mask(tiny, tmp_path):
    torch.manual_seed(0)
    mapper = GlobalMapper.from_components(tiny, input_view="object")
    mapper.save_pretrained(tmp_path / "mapper")
    assert GlobalMapper.from_pretrained(tmp_path / "mapper").input_view == "object"  # kept in the config
    pipe = ELITEPipeline(tiny, mapper)
    image = picture()
    mask = np.zeros((32, 48), bool)
    mask[8:24, 10:30] = True
    view = clip_pixels(object_crop(image, mask), 32)
    expected = mapper(clip_feature_levels(tiny.image_encoder, view[None]))[0]
    torch.testing.assert_close(pipe.encode(image, Image.fromarray(mask)).words, expected)
    with pytest.warns(UserWarning, match="without a mask it reads the whole image"):
        whole = pipe.encode(image)
    reading_the_image = copy.deepcopy(mapper)
    reading_the_image.input_view = "image"
    torch.testing.assert_close(whole.words, ELITEPipeline(tiny, reading_the_image).encode(image).words)
    with pytest.raises(ValueError, match="input_view"):
        GlobalMapper.from_components(tiny, input_view="crop")


def test_bad_images_are_refused_clearly(pipe, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable image"):
        pipe.encode(corrupt)
    with pytest.raises(FileNotFoundError):
        pipe.encode(tmp_path / "nowhere.png")


def test_token_index_selects_words(pipe):
    concept = pipe.encode(picture())
    assert torch.equal(concept.select(0), concept.words[:1])
    assert torch.equal(concept.select([2, 0]), concept.words[[2, 0]])
    assert torch.equal(concept.select("full"), concept.words)
    for bad in (5, -1, [], "all"):
        with pytest.raises(ValueError):
            concept.select(bad)
    embeds = pipe.prompt_embeddings("a photo of a S", concept, token_index=3)
    expected = encode_prompts_with_words("a photo of a S", concept.words[3:4], pipe.components.tokenizer, pipe.components.text_encoder)
    torch.testing.assert_close(embeds, expected)


def test_generation_uses_one_batched_unet_call_per_step_and_leaves_the_unet_as_it_was(pipe):
    unet = pipe.components.unet
    before = unet.attn_processors
    batches = []
    handle = unet.register_forward_pre_hook(lambda module, args, kwargs: batches.append(args[0].shape[0]), with_kwargs=True)
    try:
        out = pipe("a photo of a S on the left", pipe.encode(picture()), num_inference_steps=3,
                   generator=torch.Generator().manual_seed(0), output_type="np")
    finally:
        handle.remove()
    assert out.images.shape == (1, 32, 32, 3)
    # conditional + unconditional together, once per scheduler step (PNDM's 3 steps are 4 UNet calls)
    assert batches == [2] * len(pipe.sd_pipeline.scheduler.timesteps) and len(batches) >= 3
    assert all(unet.attn_processors[n] is p for n, p in before.items())
    # reproducible from the generator
    again = pipe("a photo of a S on the left", pipe.encode(picture()), num_inference_steps=3,
                 generator=torch.Generator().manual_seed(0), output_type="np")
    assert np.array_equal(out.images, again.images)
    assert pipe.defaults.num_inference_steps == 25 and pipe.defaults.guidance_scale == 5.0  # toy-sized defaults


def test_elite_attention_is_active_during_generation(pipe):
    unet = pipe.components.unet
    seen = []
    original = type(unet).forward

    def spy(*args, **kwargs):
        seen.append({type(unet.attn_processors[n]).__name__ for n in cross_attention_layers(unet)})
        return original(unet, *args, **kwargs)

    unet.forward = spy  # an instance attribute, removed below
    try:
        pipe("a S", pipe.encode(picture()), num_inference_steps=1, output_type="np")
    finally:
        del unet.forward
    assert seen == [{"ELITEAttnProcessor"}]


def test_prompts_without_the_placeholder_and_mismatched_mappers_are_refused(pipe, tiny):
    concept = pipe.encode(picture())
    with pytest.raises(ValueError, match="does not contain the placeholder"):
        pipe("a photo of a dog", concept, num_inference_steps=1)
    with pytest.raises(ValueError, match="2 prompts and 3 concepts"):
        pipe(["a S", "the S"], [concept] * 3, num_inference_steps=1)
    wrong = GlobalMapper(vision_width=64, text_width=32, hidden_width=8)
    with pytest.raises(ValueError, match="vision width: the components have 32, the mapper 64"):
        ELITEPipeline(tiny, wrong)
