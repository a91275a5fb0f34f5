"""The attention explorer, driven from Python as a user drives the widgets."""
import numpy as np
import pytest
from PIL import Image

from elite_tutorial import load_components
from elite_tutorial.components import ASSETS_DIR
from elite_tutorial.explorer import AttentionExplorer, View, generate, render
from elite_tutorial.mappers import GlobalMapper
from elite_tutorial.pipeline import ELITEPipeline
from elite_tutorial.toyworld.concepts import CONCEPTS, concept_views


@pytest.fixture(scope="module")
def toy_pipe():
    return ELITEPipeline(load_components("toy"), GlobalMapper.from_pretrained(ASSETS_DIR / "toy-global-mapper"))


def pixels(png: bytes) -> np.ndarray:
    import io
    return np.asarray(Image.open(io.BytesIO(png)))


def test_render_is_a_pure_function_of_the_view(toy_pipe):
    image, mask = concept_views(CONCEPTS[0])[0]
    generation = generate(toy_pipe, toy_pipe.encode(image, mask), "a photo of a S on the left", seed=1)
    first = render(View(word="w0"), generation)
    assert first.size == (2 * 64 * 4 + 8, 64 * 4)
    assert np.array_equal(np.asarray(render(View(word="w0"), generation)), np.asarray(first))
    one_layer = generation.capture.layers[-1]
    for other in (View(word="left"), View(word="w0", head=2), View(word="w0", steps=(0, 4)), View(word="w0", resolution=8),
                  View(word="w0", layer=one_layer)):
        assert not np.array_equal(np.asarray(render(other, generation)), np.asarray(first)), other
    with pytest.raises(ValueError, match="not a word"):
        render(View(word="dog"), generation)


def test_widget_controls_re_render_without_generating_again(toy_pipe):
    explorer = AttentionExplorer(toy_pipe, {c.name: concept_views(c)[0] for c in CONCEPTS[:2]})
    assert explorer.local_scale.disabled  # no local mapper: λ has nothing to scale
    explorer.generate_button.click()
    generation, shown = explorer.generation, pixels(explorer.image.value)
    assert explorer.word.value == "w0" and "steps captured" in explorer.status.value
    explorer.word.value = "left"
    assert not np.array_equal(pixels(explorer.image.value), shown)
    after_word = pixels(explorer.image.value)
    explorer.layer.value = explorer.layer.options[-1][1]  # one layer
    assert not np.array_equal(pixels(explorer.image.value), after_word)
    after_layer = pixels(explorer.image.value)
    explorer.opacity.value = 0.0
    assert not np.array_equal(pixels(explorer.image.value), after_layer)
    assert explorer.generation is generation  # the view controls did not generate
    explorer.concept.value = CONCEPTS[1].name
    explorer.generate_button.click()
    assert explorer.generation is not generation
    explorer.prompt.value = "a photo of a circle"  # no placeholder
    explorer.generate_button.click()
    assert "placeholder" in explorer.status.value
