"""Compound words: the fused captions, the compound embeddings, the teaching stage and the regression fit."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from elite_tutorial import load_components
from elite_tutorial.components import ASSETS_DIR
from elite_tutorial.evaluation import textual_inversion_generator, words_generator
from elite_tutorial.pipeline import TOY_DEFAULTS
from elite_tutorial.studies import compounds as C
from elite_tutorial.studies import pretrain as P
from elite_tutorial.toyworld.concepts import CONCEPTS
from elite_tutorial.words import compound_embeddings


@pytest.mark.research
def test_fusing_replaces_the_run_of_identity_words_by_the_placeholder():
    assert C.fuse_identity_words("a photo of a large red dotted circle on the left") == (
        "a photo of a large S on the left", ["red", "dotted", "circle"])
    assert C.fuse_identity_words("a small triangle, on a grass background") == (
        "a small S, on a grass background", ["triangle"])
    for text in ("a red circle and a blue star", "a photo of a large object", "a red large circle"):
        with pytest.raises(ValueError, match="one run of identity words"):
            C.fuse_identity_words(text)
    rng = np.random.default_rng(0)  # every caption of a single-object scene fuses
    for _ in range(200):
        text = P.caption(P.random_spec(rng, 0.0), rng, 0.3)
        fused, words = C.fuse_identity_words(text)
        assert fused.count("S") == 1 and fused.replace("S", " ".join(words)) == text


def test_a_compound_is_the_sum_of_its_words_and_one_word_is_that_word():
    toy = load_components("toy", device="cpu")
    table = toy.text_encoder.get_input_embeddings().weight
    ids = [toy.tokenizer(word, add_special_tokens=False).input_ids[0] for word in ("red", "dotted", "circle")]
    compound = compound_embeddings(toy, ["red dotted circle", "circle"])
    assert torch.equal(compound[0], table[ids].sum(0)) and torch.equal(compound[1], table[ids[2]])
    with pytest.raises(ValueError, match="single token"):
        compound_embeddings(toy, ["red zebra"])
    # a one-word compound at S is that word written in the prompt: the same images
    as_compound = textual_inversion_generator(toy, compound[1:], samples=1, seed=0, defaults=TOY_DEFAULTS)
    as_word = words_generator(toy, ["circle"], samples=1, seed=0)
    with torch.no_grad():
        assert np.array_equal(as_compound("a photo of a S"), as_word("a photo of a S"))


@pytest.mark.research
def test_teaching_trains_the_encoder_layers_only_and_writes_a_loadable_folder(tmp_path):
    recipe = replace(C.CompoundRecipe(), pool_size=32, steps=3, batch=2, keep_batch=4, warmup_steps=1)
    record = C.teach_compound_words(ASSETS_DIR / "toy-sd", tmp_path / "taught", recipe, "cpu", command="teach")
    assert not (tmp_path / "taught.work").exists()
    assert set(record["loss_last"]) == {"loss_compound", "loss_keep"}
    log = json.loads((tmp_path / "taught" / "pretrain_log.json").read_text())
    assert log["compound_words"]["command"] == "teach" and "recipe" in log  # the pretraining record is kept
    before = dict(load_components("toy", device="cpu").text_encoder.named_parameters())
    after = dict(load_components(tmp_path / "taught", device="cpu").text_encoder.named_parameters())
    for name, parameter in after.items():  # the vocabulary is kept; every layer's matrices learn
        if name.startswith("embeddings."):
            assert torch.equal(parameter, before[name]), name
        elif name.endswith(("proj.weight", "fc1.weight", "fc2.weight")):
            assert not torch.equal(parameter, before[name]), name
    with pytest.raises(FileExistsError):
        C.teach_compound_words(ASSETS_DIR / "toy-sd", tmp_path / "taught", recipe, "cpu")
    unet = dict(load_components(tmp_path / "taught", device="cpu").unet.named_parameters())
    shipped = dict(load_components("toy", device="cpu").unet.named_parameters())
    assert all(torch.equal(parameter, shipped[name]) for name, parameter in unet.items())  # the UNet is the components'


@pytest.mark.research
def test_with_unet_kv_the_cross_attention_keys_and_values_learn_and_nothing_else_of_the_unet(tmp_path):
    recipe = replace(C.CompoundRecipe(), pool_size=32, steps=3, batch=2, keep_batch=4, warmup_steps=1, unet_kv=True)
    C.teach_compound_words(ASSETS_DIR / "toy-sd", tmp_path / "taught", recipe, "cpu")
    shipped = dict(load_components("toy", device="cpu").unet.named_parameters())
    taught = dict(load_components(tmp_path / "taught", device="cpu").unet.named_parameters())
    learned = {name for name, parameter in taught.items() if not torch.equal(parameter, shipped[name])}
    assert learned and all(".attn2.to_k." in name or ".attn2.to_v." in name for name in learned)
    assert len(learned) == sum(".attn2.to_k." in name or ".attn2.to_v." in name for name in shipped)


@pytest.mark.research
def test_the_student_starts_as_the_teacher_and_learns_the_compounds(tmp_path, monkeypatch):
    """At step 0 the student is the frozen encoder (loss_keep 0); on one repeated batch a few steps
    shrink loss_compound."""
    toy = load_components("toy", device="cpu")
    pool = P.ScenePool(0, 32, processes=1)
    # every caption names its whole identity, so every fused word has something to learn (a dropped
    # attribute can leave a one-word "compound" that reads as the word already)
    recipe = replace(C.CompoundRecipe(), steps=30, batch=4, keep_batch=4, lr=3e-4, warmup_steps=1, caption_drop=0.0)

    def capture(name, model, make_batch, loss_fn, *args, **kwargs):
        batch = make_batch(np.random.default_rng(0))
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=recipe.lr)
        history = []
        for _ in range(recipe.steps):
            losses = loss_fn(batch, torch.Generator().manual_seed(0))
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            history.append({k: v.item() for k, v in losses.items()})
        return history

    monkeypatch.setattr(C, "train_loop", capture)
    _, _, history = C.train_compounds(pool, toy, recipe, tmp_path, "cpu")
    assert history[0]["loss_keep"] == 0
    assert history[-1]["loss_compound"] < 0.5 * history[0]["loss_compound"]


@pytest.mark.research
def test_a_fitted_mapper_beats_a_constant_word_on_held_out_objects():
    toy = load_components("toy", device="cpu")
    mapper, report = C.fit_mapper_to_compounds(toy, count=512, epochs=20, held_out=200, progress=False)
    assert mapper.input_view == "object"
    assert report["held_out_mse"] < 0.8 * report["held_out_variance"]


def test_a_box_view_mapper_is_fitted_on_the_padded_box_around_each_object():
    """Stage 1 reads the padded box (`--toy-global-view box`); a fitted start for it must read the same."""
    toy = load_components("toy", device="cpu")
    boxes, phrases = C._object_views(toy, 4, C.FIT_SEED, view="box")
    objects, same_phrases = C._object_views(toy, 4, C.FIT_SEED, view="object")
    assert phrases == same_phrases and boxes[0].shape == objects[0].shape
    assert not torch.allclose(boxes[0], objects[0])  # the box keeps the background the object view paints out
    mapper, _ = C.fit_mapper_to_compounds(toy, count=16, epochs=1, held_out=8, progress=False, view="box")
    assert mapper.input_view == "box"
    with pytest.raises(ValueError, match="view must be one of"):
        C.fit_mapper_to_compounds(toy, count=16, epochs=1, held_out=8, progress=False, view="crop")


@pytest.mark.research
def test_fused_captions_never_show_a_personal_concept(tmp_path, monkeypatch):
    """The compound words a teaching step reads are training identities' only, so a concept's compound
    word is as new to the taught encoder as to a mapper (gate 3)."""
    pool = P.ScenePool(0, 32, two_object_probability=0.0, processes=1)
    for index, concept in enumerate(CONCEPTS):  # half the pool shows a personal concept
        spec = pool.specs[index]
        pool.specs[index] = replace(spec, objects=(replace(spec.objects[0], **concept.labels()),))
    shown = []

    def draw_batches(name, model, make_batch, *args, **kwargs):
        rng = np.random.default_rng(0)
        shown.extend(index for _ in range(50) for index in make_batch(rng)["index"].tolist())
        return [{}]

    monkeypatch.setattr(C, "train_loop", draw_batches)
    C.train_compounds(pool, load_components("toy", device="cpu"), C.CompoundRecipe(batch=4, keep_batch=4), tmp_path, "cpu")
    assert len(shown) == 200 and min(shown) >= len(CONCEPTS)


@pytest.mark.research
def test_fused_words_are_read_with_noise_of_at_most_the_recipe_scale():
    """Each row of a batch gets its own noise scale in [0, noise]; no noise leaves the exact sums."""
    compounds = torch.zeros(256, 1, 128)
    assert C.jitter_compounds(compounds, 0.0, torch.Generator().manual_seed(0)) is compounds
    jittered = C.jitter_compounds(compounds, 0.012, torch.Generator().manual_seed(0))
    per_row = jittered.std(dim=(1, 2))
    assert per_row.max() < 0.012 * 1.2 and per_row.min() < 0.003 and per_row.max() > 0.009
    again = C.jitter_compounds(compounds, 0.012, torch.Generator().manual_seed(0))
    assert torch.equal(jittered, again)  # the step's generator decides it: exact resume


@pytest.mark.research
def test_the_teaching_step_reads_the_jittered_words(monkeypatch, tmp_path):
    """What the student reads at S is the compound plus the recipe's noise, not the exact sum."""
    toy = load_components("toy", device="cpu")
    pool = P.ScenePool(0, 32, two_object_probability=0.0, processes=1)
    read = []
    encode = C.encode_prompts_with_words

    def spy(prompts, words, *args, **kwargs):
        read.append(words.detach().clone())
        return encode(prompts, words, *args, **kwargs)

    def one_step(name, model, make_batch, loss_fn, *args, **kwargs):
        batch = make_batch(np.random.default_rng(0))
        exact.append(compound_embeddings(toy, batch["compounds"])[:, None])
        loss_fn(batch, torch.Generator().manual_seed(0))
        return [{}]

    exact = []
    monkeypatch.setattr(C, "encode_prompts_with_words", spy)
    monkeypatch.setattr(C, "train_loop", one_step)
    for noise in (0.0, 0.012):
        read.clear(), exact.clear()
        C.train_compounds(pool, toy, C.CompoundRecipe(batch=4, keep_batch=4, compound_noise=noise), tmp_path, "cpu")
        difference = (read[0] - exact[0]).abs().max().item()
        assert (difference == 0) if noise == 0 else (0 < difference < 0.1)
