"""Each word's attention on the object against around it, on reference views whose object is known."""
import numpy as np
import torch

from elite_tutorial import load_components
from elite_tutorial.attention_on_object import (
    attention_on_object,
    compound_word_attention_on_object,
    object_cells,
    said_in_words_attention_on_object,
)
from elite_tutorial.components import ASSETS_DIR
from elite_tutorial.mappers import GlobalMapper
from elite_tutorial.pipeline import ELITEPipeline
from elite_tutorial.toyworld.concepts import CONCEPTS


def test_object_cells_are_the_cells_the_object_covers_at_least_half_of():
    mask = np.zeros((64, 64), dtype=bool)
    mask[:32, :16] = True     # the top-left quarter of the columns' first half: cells (0..7, 0..3) at 16 x 16
    mask[40:41, 40:64] = True  # a 1-pixel stripe: a quarter of six 4 x 4 cells
    cells = object_cells(mask, 16)
    assert cells.shape == (16, 16) and cells.dtype == torch.bool
    assert cells[:8, :4].all() and int(cells.sum()) == 32


def test_the_toy_model_reads_a_shape_word_on_the_object_and_ratios_are_per_concept_and_word():
    components = load_components("toy", device="cpu")
    concepts = CONCEPTS[:2]
    said = said_in_words_attention_on_object(components, concepts)
    assert said.shape == (2, 2)
    assert (said[:, 0] > 2).all()  # "heart", "circle": read on the object several times more than around it
    pipe = ELITEPipeline(components, GlobalMapper.from_pretrained(ASSETS_DIR / "toy-global-mapper"))
    words = attention_on_object(pipe, concepts, num_words=2)
    compound = compound_word_attention_on_object(components, concepts)
    assert words.shape == (2, 2) and compound.shape == (2, 1)
    assert torch.isfinite(words).all() and (words > 0).all() and (compound > 0).all()
    # seeded: the same views, noise and words give the same ratios
    assert torch.equal(words, attention_on_object(pipe, concepts, num_words=2))
