"""Inputs a user can get wrong: each gets a clear error (naming the value and what to do) or is handled
correctly; nothing is silently wrong. Grouped by area; docs/bad-inputs.md lists them."""
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from elite_tutorial import load_components, storage, words
from elite_tutorial.cli import main as elite_train
from elite_tutorial.components import ASSETS_DIR, default_device_and_dtype
from elite_tutorial.data import concept_folder, load_image, load_mask
from elite_tutorial.mappers import GlobalMapper, LocalMapper
from elite_tutorial.pipeline import ELITEPipeline
from elite_tutorial.storage import atomic_directory
from elite_tutorial.training import PROFILES
from elite_tutorial.words import tokenize_with_placeholder


def picture(size=(48, 40)):
    return np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pipe(tiny):
    torch.manual_seed(0)
    return ELITEPipeline(tiny, GlobalMapper.from_components(tiny), LocalMapper.from_components(tiny))


# --------------------------------------------------------------------------------------------------
# Prompts: the placeholder is a whole word; a word-list tokenizer names the words it lacks.

def test_the_placeholder_is_matched_as_a_whole_word_only(tiny, monkeypatch):
    # as with CLIP's own vocabulary, where rare words split legitimately: "bus" -> "bu" "s", "paris" -> ... "s"
    monkeypatch.setattr(words, "has_word_list_vocabulary", lambda tokenizer: False)
    with pytest.raises(ValueError, match="does not contain the placeholder"):
        tokenize_with_placeholder(tiny.tokenizer, ["a photo of a dog in the bus"], 1)
    _, start = tokenize_with_placeholder(tiny.tokenizer, ["a photo of a S in Paris"], 1)
    assert start.tolist() == [5]  # <start> a photo of a S: one placeholder, not two


def test_words_a_word_list_vocabulary_lacks_are_named(tiny):
    toy = CLIPTokenizer.from_pretrained(ASSETS_DIR / "toy-sd" / "tokenizer")
    assert words.has_word_list_vocabulary(toy) and words.has_word_list_vocabulary(tiny.tokenizer)
    with pytest.raises(ValueError, match=r"lacks: 'dog', 'bus'"):
        tokenize_with_placeholder(toy, ["a photo of a dog in the bus"], 1)
    with pytest.raises(ValueError, match=r"lacks: 'paris'"):
        tokenize_with_placeholder(tiny.tokenizer, ["a photo of a S in Paris"], 1)
    _, start = tokenize_with_placeholder(toy, ["a close-up photo of a red S on the left"], 5)  # known words pass
    assert start.tolist() == [9]  # <start> a close - up photo of a red S


# --------------------------------------------------------------------------------------------------
# Sampling arguments.

@pytest.mark.parametrize("arguments, message", [
    (dict(num_inference_steps=0), "num_inference_steps .* not 0"),
    (dict(num_inference_steps=-1), "num_inference_steps .* not -1"),
    (dict(num_inference_steps=2.5), "num_inference_steps .* not 2.5"),
    (dict(guidance_scale=math.nan), "guidance_scale .* not nan"),
    (dict(guidance_scale=-1.0), "guidance_scale .* not -1.0"),
    (dict(local_scale=math.nan), "local_scale .* not nan"),
    (dict(local_scale=-0.5), "local_scale .* not -0.5"),
    (dict(num_inference_steps=5000), "num_inference_steps must be a whole number from 1 to 1000 .* not 5000"),
    (dict(height=10), "height must be a positive multiple of 8 .* not 10"),
    (dict(width=0), "width must be a positive multiple of 8 .* not 0"),
    (dict(height=-16), "height must be a positive multiple"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a whole number of at least 1, not 0"),
    (dict(negative_prompt="a blurry teapot"), "lacks: 'blurry', 'teapot'"),
])
def test_bad_sampling_arguments_are_refused(pipe, arguments, message):
    concept = pipe.encode(picture())
    with pytest.raises(ValueError, match=message):
        pipe("a photo of a S", concept, **arguments)


def test_height_and_width_each_default_on_their_own(pipe):
    concept = pipe.encode(picture())
    default = pipe.components.unet.config.sample_size * pipe.sd_pipeline.vae_scale_factor
    for given, shape in ((dict(height=16), (16, default)), (dict(width=16), (default, 16))):
        images = pipe("a photo of a S", concept, num_inference_steps=1, output_type="np", **given).images
        assert images.shape[1:3] == shape


def test_scales_far_outside_their_usual_range_warn(pipe):
    concept = pipe.encode(picture())
    for arguments, message in ((dict(guidance_scale=40.0), "far above the usual"), (dict(local_scale=3.0), "above 2")):
        with pytest.warns(UserWarning, match=message):
            pipe("a photo of a S", concept, num_inference_steps=1, **arguments)


def test_non_finite_latents_are_not_returned_silently(pipe):
    concept = pipe.encode(picture())
    broken = pipe.encode(picture())
    broken.words = torch.full_like(concept.words, math.nan)
    for output_type in ("pil", "np"):
        with pytest.raises(FloatingPointError, match="NaN or infinite latents at step 1.*guidance_scale"):
            pipe("a photo of a S", broken, num_inference_steps=2, output_type=output_type)


# --------------------------------------------------------------------------------------------------
# Images and masks.

def test_a_photos_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view", as a phone held upright stores it
    Image.fromarray(picture((40, 20))).save(tmp_path / "photo.jpg", exif=exif)  # stored sideways
    assert load_image(tmp_path / "photo.jpg").size == (20, 40)
    assert load_image(Image.open(tmp_path / "photo.jpg")).size == (20, 40)


def test_a_mask_in_the_alpha_channel_marks_the_object():
    alpha = np.zeros((20, 24), np.uint8)
    alpha[5:15, 4:10] = 255
    rgba = np.dstack([np.full((20, 24, 3), 255, np.uint8), alpha])  # all white, the object in the alpha
    assert np.array_equal(load_mask(Image.fromarray(rgba)), alpha > 0)


def test_a_jpeg_compressed_mask_keeps_its_edges(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 20:40] = 255
    path = tmp_path / "mask.jpg"
    Image.fromarray(mask).save(path, quality=30)
    assert (load_mask(path) != (mask > 0)).mean() < 0.01  # not grown by the JPEG's faint noise


def test_a_label_mask_of_zeros_and_ones_still_marks_the_object():
    mask = np.zeros((20, 24), np.uint8)
    mask[5:15, 4:10] = 1
    assert np.array_equal(load_mask(mask), mask > 0)


def test_a_mask_smaller_than_one_patch_warns(pipe):
    mask = np.zeros((40, 48), np.uint8)
    mask[2, 2] = 255  # one pixel: the 8 x 8 patch grid misses it
    with pytest.warns(UserWarning, match="smaller than one patch"):
        concept = pipe.encode(picture(), mask)
    assert not concept.local_tokens.any()


# --------------------------------------------------------------------------------------------------
# Arrays and tensors given to `encode`.

def test_float_channels_first_and_tensor_images_read_as_the_uint8_image(pipe):
    pixels = picture()
    reference = np.asarray(load_image(pixels))
    as_float = pixels / 255.0
    for variant in (as_float, pixels.transpose(2, 0, 1), torch.from_numpy(pixels).permute(2, 0, 1),
                    torch.from_numpy(as_float).permute(2, 0, 1).float()):
        assert np.array_equal(np.asarray(load_image(variant)), reference)
    expected = pipe.encode(pixels).words
    assert torch.allclose(pipe.encode(torch.from_numpy(as_float).permute(2, 0, 1)).words, expected)


@pytest.mark.parametrize("array, message", [
    (np.full((8, 8, 3), -0.5), r"\[0, 1\] .* -0.5\.\.-0.5"),
    (np.full((8, 8, 3), np.nan), "nan"),
    (np.zeros((2, 8, 8, 3), np.uint8), r"shape \(2, 8, 8, 3\)"),
    (np.full((8, 8), 300, np.int64), "0..255"),
])
def test_arrays_that_are_no_image_are_refused(array, message):
    with pytest.raises(ValueError, match=message):
        load_image(array)


# --------------------------------------------------------------------------------------------------
# Loading mappers.

@pytest.fixture
def saved_mapper(tiny, tmp_path):
    folder = tmp_path / "mapper"
    GlobalMapper.from_components(tiny).save_pretrained(folder)
    return folder


def test_non_finite_weights_are_refused(tiny, saved_mapper):
    mapper = GlobalMapper.from_components(tiny)
    with torch.no_grad():
        mapper.mapping[0][0].weight[0, 0] = math.nan
    mapper.save_pretrained(saved_mapper)
    with pytest.raises(ValueError, match=r"model.safetensors holds NaN or infinite weights \(mapping.0.0.weight\)"):
        GlobalMapper.from_pretrained(saved_mapper)
    with pytest.raises(ValueError, match="the state dict holds NaN"):
        GlobalMapper.from_official(mapper.official_state_dict())


def test_from_official_refuses_the_local_mappers_file_and_what_is_no_pt_checkpoint(tiny, saved_mapper, tmp_path):
    local = tmp_path / "local_mapper.pt"
    torch.save(LocalMapper.from_components(tiny).official_state_dict(), local)
    with pytest.raises(ValueError, match="local mapper; load it with LocalMapper.from_official"):
        GlobalMapper.from_official(local)
    text = tmp_path / "notes.txt"
    text.write_text("elite notes\n")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        GlobalMapper.from_official(text)
    with pytest.raises(ValueError, match="a safetensors file.* from_pretrained"):
        GlobalMapper.from_official(saved_mapper / "model.safetensors")
    with pytest.raises(ValueError, match="is a folder; .* from_pretrained"):
        GlobalMapper.from_official(saved_mapper)


def test_a_local_path_that_does_not_exist_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # were it sent to the Hub, fail fast rather than retry
    for path in (tmp_path / "runs" / "mapper", "./no-such-mapper", str(tmp_path / "x")):
        with pytest.raises(FileNotFoundError, match="No folder at"):
            GlobalMapper.from_pretrained(path)


def test_broken_mapper_folders_name_the_file(saved_mapper):
    (saved_mapper / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        GlobalMapper.from_pretrained(saved_mapper)
    (saved_mapper / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config.json is missing"):
        GlobalMapper.from_pretrained(saved_mapper)


def test_a_truncated_safetensors_file_is_named(saved_mapper):
    weights = saved_mapper / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
        GlobalMapper.from_pretrained(saved_mapper)


def test_a_global_folder_loaded_as_a_local_mapper_says_so(saved_mapper):
    with pytest.raises(ValueError, match="holds a global mapper; load it with GlobalMapper"):
        LocalMapper.from_pretrained(saved_mapper)
    with pytest.raises(ValueError, match="is a file; .* from_official"):
        GlobalMapper.from_pretrained(saved_mapper / "model.safetensors")


# --------------------------------------------------------------------------------------------------
# Components.

def test_a_dtype_may_be_named_and_a_bad_name_is_refused():
    assert default_device_and_dtype("cpu", "float16") == (torch.device("cpu"), torch.float16)
    assert default_device_and_dtype("cpu", "torch.bfloat16")[1] == torch.bfloat16
    components = load_components("tiny-random", device="cpu", dtype="bfloat16")
    assert {model.dtype for model in components.models().values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="'float17'"):
        default_device_and_dtype("cpu", "float17")


def test_a_device_this_machine_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda', but PyTorch finds no CUDA GPU"):
        load_components("tiny-random", device="cuda")
    with pytest.raises(ValueError, match="'gpu' is not a device name"):
        load_components("tiny-random", device="gpu")


# --------------------------------------------------------------------------------------------------
# elite-train's numbers: refused by argparse, before anything loads.

@pytest.mark.parametrize("option, value, message", [
    ("--steps", "0", "must be at least 1, not 0"),
    ("--steps", "-1", "must be at least 1, not -1"),
    ("--gradient-accumulation", "0", "must be at least 1, not 0"),
    ("--keep-checkpoints", "0", "must be at least 1, not 0 .*--resume"),
    ("--keep-checkpoints", "-1", "must be at least 1, not -1"),
    ("--learning-rate", "nan", "finite number at least 0, not nan"),
    ("--learning-rate", "-0.5", "finite number at least 0, not -0.5"),
    ("--toy-context-probability", "1.5", "at least 0 and at most 1, not 1.5"),
    ("--num-words", "7", r"invalid choice: 7 \(choose from 1, 2, 3, 4, 5\)"),
    ("--batch-size", "0", "must be at least 1, not 0"),
    ("--checkpoint-every", "0", "must be at least 1, not 0"),
    ("--reg-weight", "-1", "at least 0, not -1"),
])
def test_bad_training_numbers_are_refused_before_anything_loads(tmp_path, capsys, monkeypatch, option, value, message):
    monkeypatch.setattr("elite_tutorial.cli.load_components", lambda *a, **k: pytest.fail("components loaded"))
    with pytest.raises(SystemExit) as exit_:
        elite_train(["global", "--preset", "tiny-random", "--profile", "smoke", option, value, "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {option}:" in error
    assert re.search(message, error)


def test_an_out_that_is_a_file_and_a_missing_mapper_fail_before_anything_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("elite_tutorial.cli.load_components", lambda *a, **k: pytest.fail("components loaded"))
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(SystemExit):
        elite_train(["global", "--profile", "smoke", "--out", str(tmp_path / "notes.txt")])
    assert "notes.txt is a file; give a folder" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="No folder at"):
        elite_train(["local", "--profile", "smoke", "--global-mapper", str(tmp_path / "runs" / "global"),
                     "--out", str(tmp_path / "run")])


def test_recipes_refuse_the_same_numbers():
    for field, value in (("steps", 0), ("gradient_accumulation", 0), ("keep_checkpoints", 0), ("num_words", 7),
                         ("learning_rate", math.nan)):
        with pytest.raises(ValueError, match=field):
            replace(PROFILES["smoke"], **{field: value})


# --------------------------------------------------------------------------------------------------
# Atomic folders: nothing lost.

def write(folder, text):
    with atomic_directory(folder) as staging:
        (staging / "file.txt").write_text(text)


def failing_second_replace(monkeypatch):
    """os.replace that fails on its second call: a crash between the two renames of an overwrite."""
    real, calls = storage.os.replace, []

    def replace_(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args)
    monkeypatch.setattr(storage.os, "replace", replace_)


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-swap", "two-renames"])
def test_an_overwrite_never_leaves_the_folder_missing(tmp_path, monkeypatch, exchange):
    folder = tmp_path / "mapper"
    write(folder, "old")
    if not exchange:  # a system without an atomic swap of two folders
        monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    failing_second_replace(monkeypatch)
    try:
        write(folder, "new")
    except KeyboardInterrupt:
        pass
    assert (folder / "file.txt").read_text() in ("old", "new")
    assert [p.name for p in tmp_path.iterdir()] == ["mapper"]


def dead_process_id():
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_a_killed_writers_leftovers_are_cleaned_and_the_old_copy_put_back(tmp_path):
    folder, pid = tmp_path / "mapper", dead_process_id()
    old = tmp_path / f".mapper.old-{pid}-abc123" / "mapper"  # killed between the two renames of an overwrite
    old.mkdir(parents=True)
    (old / "file.txt").write_text("old")
    (tmp_path / f".mapper.staging-{pid}-def456").mkdir()  # its half-written new copy
    (tmp_path / f".mapper2.staging-{pid}-x").mkdir()  # another folder's: left alone
    with pytest.raises(RuntimeError):
        with atomic_directory(folder):
            raise RuntimeError("the next write fails too")
    assert (folder / "file.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".mapper2.staging-{pid}-x", "mapper"]


def test_a_mappers_log_is_written_with_it(tiny, tmp_path):
    GlobalMapper.from_components(tiny).save_pretrained(tmp_path / "mapper", log={"history": [1]})
    assert json.loads((tmp_path / "mapper" / "log.json").read_text()) == {"history": [1]}


# --------------------------------------------------------------------------------------------------
# Nothing a user owns is deleted: a save replaces only a folder of its own files.

def users_folder(folder):
    """A project folder with a user's notes and photos in it."""
    (folder / "photos").mkdir(parents=True)
    (folder / "photos" / "cat.jpg").write_bytes(b"jpeg")
    (folder / "notes.txt").write_text("mine")
    return folder


def still_there(folder):
    return (folder / "notes.txt").read_text() == "mine" and (folder / "photos" / "cat.jpg").read_bytes() == b"jpeg"


def test_a_mapper_save_refuses_a_folder_with_the_users_files_and_lists_them(tiny, tmp_path):
    mapper = GlobalMapper.from_components(tiny)
    folder = users_folder(tmp_path / "project")
    with pytest.raises(FileExistsError, match=r"project holds files that this save did not write \(notes.txt, photos\)"):
        mapper.save_pretrained(folder)
    assert still_there(folder) and sorted(p.name for p in tmp_path.iterdir()) == ["project"]
    runs = tmp_path / "runs"  # a folder of runs is not a mapper's either
    (runs / "run-1" / "mapper").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="run-1"):
        mapper.save_pretrained(runs)
    assert (runs / "run-1" / "mapper").is_dir()


def test_a_mapper_save_replaces_its_own_earlier_save(tiny, tmp_path):
    folder = tmp_path / "mapper"
    GlobalMapper.from_components(tiny).save_pretrained(folder, log={"history": [1]})
    GlobalMapper.from_components(tiny).save_pretrained(folder)  # an earlier save's log.json is the mapper's own
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    empty = tmp_path / "empty"
    empty.mkdir()
    GlobalMapper.from_components(tiny).save_pretrained(empty)
    assert (empty / "model.safetensors").is_file()


def test_the_concepts_writer_refuses_a_folder_with_other_files(tmp_path):
    from elite_tutorial.toyworld.concepts import CONCEPTS, write_concepts
    folder = users_folder(tmp_path / "concepts")
    with pytest.raises(FileExistsError, match="notes.txt, photos"):
        write_concepts(folder, CONCEPTS[:1])
    assert still_there(folder)
    written = write_concepts(tmp_path / "mine", CONCEPTS[:2])
    write_concepts(written, CONCEPTS[:1])  # its own earlier output: replaced
    assert sorted(p.name for p in written.iterdir()) == sorted([CONCEPTS[0].name, "labels.json"])


def test_the_check_is_made_before_the_work_and_again_before_the_swap(tmp_path):
    folder = users_folder(tmp_path / "folder")
    work = []
    with pytest.raises(FileExistsError):
        with atomic_directory(folder, own=("config.json",)):
            work.append("done")
    assert not work and still_there(folder)
    late = tmp_path / "late"
    with pytest.raises(FileExistsError, match="diary.txt"):
        with atomic_directory(late, own=("config.json",)) as staging:
            (staging / "config.json").write_text("{}")
            late.mkdir()
            (late / "diary.txt").write_text("written while the save worked")
    assert (late / "diary.txt").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["folder", "late"]


def test_a_save_names_the_target_when_its_parent_is_a_file_or_it_is_the_current_folder(tiny, tmp_path, monkeypatch):
    mapper = GlobalMapper.from_components(tiny)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(NotADirectoryError, match=r"Cannot save to .*notes.txt/mapper: .*notes.txt is a file"):
        mapper.save_pretrained(tmp_path / "notes.txt" / "mapper")
    with pytest.raises(FileExistsError, match="notes.txt is a file; give a folder"):
        mapper.save_pretrained(tmp_path / "notes.txt")
    monkeypatch.chdir(tmp_path)
    for current in (".", "..", tmp_path):
        with pytest.raises(ValueError, match="current folder or holds it.*Name a subfolder"):
            mapper.save_pretrained(current)
    mapper.save_pretrained("./mapper")
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "mapper" / "config.json").is_file()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_a_save_into_a_read_only_folder_names_the_target(tiny, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=r"Cannot save to .*locked/mapper: its folder .*locked is not writable"):
            GlobalMapper.from_components(tiny).save_pretrained(locked / "mapper")
    finally:
        locked.chmod(0o700)


def test_elite_train_out_must_be_this_stages_run_or_new(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("elite_tutorial.cli.load_components", lambda *a, **k: pytest.fail("components loaded"))

    def refused(stage, out, *extra):
        with pytest.raises(SystemExit):
            elite_train([stage, "--profile", "smoke", "--out", str(out), *extra,
                         *(["--global-mapper", str(ASSETS_DIR / "toy-global-mapper")] if stage == "local" else [])])
        return capsys.readouterr().err

    assert "notes.txt, photos" in refused("global", users_folder(tmp_path / "project"))
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "checkpoints" / "step-000002" / "log.json").write_text(json.dumps({"stage": "global", "recipe": {}}))
    assert "pass --resume latest to continue it" in refused("global", run)
    assert "holds a global mapper's run; give stage local a folder of its own" in refused("local", run, "--resume", "latest")
    (tmp_path / "fresh").mkdir()
    assert "no checkpoint in" in refused("global", tmp_path / "fresh", "--resume", "latest")


# --------------------------------------------------------------------------------------------------
# The evaluation commands: counts and output paths checked before anything loads.

@pytest.mark.parametrize("command, arguments, message", [
    ("evaluation", ["--samples", "0"], "argument --samples: must be at least 1, not 0"),
    ("evaluation", ["--local-scale", "nan"], "argument --local-scale: must be a finite number at least 0, not nan"),
    ("evaluation", ["--out", "{tmp}"], "argument --out: .* is a folder; give a file name"),
    ("evaluation", ["--out", "{tmp}/notes.txt/results.json"], "argument --out: cannot write .*notes.txt is a file"),
    ("comparison", ["--concepts", "0"], "argument --concepts: must be at least 1, not 0"),
    ("comparison", ["--concepts", "99"], "there are 16 test concepts, not 99"),
    ("comparison", ["--samples", "-1"], "argument --samples: must be at least 1, not -1"),
])
def test_evaluation_commands_check_their_arguments_before_loading(tmp_path, capsys, monkeypatch, command, arguments, message):
    from elite_tutorial import comparison, evaluation
    module = {"evaluation": evaluation, "comparison": comparison}[command]
    monkeypatch.setattr(module, "load_components", lambda *a, **k: pytest.fail("components loaded"))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        module.main([a.replace("{tmp}", str(tmp_path)) for a in arguments])
    assert exit_.value.code == 2 and re.search(message, capsys.readouterr().err)


# --------------------------------------------------------------------------------------------------
# Masks that are probably wrong.

def concept_view(index=0):
    folder = ASSETS_DIR / "concepts" / "red_dotted_heart"
    return Image.open(folder / f"{index}.png"), Image.open(folder / f"{index}_bg.png")


def test_mask_files_under_other_names_are_read_as_masks_never_as_views(tmp_path):
    image, mask = concept_view()
    for name in ("0.png", "1.jpg", "2.png", "3.png"):
        image.convert("RGB").save(tmp_path / name)
    mask.save(tmp_path / "0_bg.png")
    mask.convert("RGB").save(tmp_path / "1-BG.jpg")    # other case, separator, format
    mask.save(tmp_path / "2_mask.png")                 # other suffix
    mask.save(tmp_path / "3_bg.webp")
    mask.save(tmp_path / "7_bg.png")                   # no view 7
    with pytest.warns(UserWarning, match=r"7_bg.png look\(s\) like masks but no view has that name"):
        views = concept_folder(tmp_path)
    assert [(i.name, m.name) for i, m in views] == [("0.png", "0_bg.png"), ("1.jpg", "1-BG.jpg"),
                                                    ("2.png", "2_mask.png"), ("3.png", "3_bg.webp")]


def test_a_photo_given_as_the_mask_and_an_inverted_mask_warn(tmp_path):
    image, mask = concept_view()
    with pytest.warns(UserWarning, match="not two-toned .* looks like a photo. Are the image and the mask swapped"):
        load_mask(image)
    _, small = concept_view(3)  # the small view: the object is a few percent of the image
    with pytest.warns(UserWarning, match="touches every edge: it looks inverted"):
        load_mask(255 - np.asarray(small))


def test_real_masks_jpeg_masks_and_box_crops_raise_no_warning(tmp_path):
    import warnings
    _, mask = concept_view()
    mask.convert("RGB").save(tmp_path / "m.jpg", quality=70)
    box = np.zeros((120, 100), np.uint8)
    box[10:110, 10:90] = 255  # a padded box crop: the object fills most of it, not its edges
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for given in (mask, tmp_path / "m.jpg", box, *sorted((ASSETS_DIR / "concepts").glob("*/*_bg.png"))):
            load_mask(given)


# --------------------------------------------------------------------------------------------------
# Files that lie: config.json and the weights' checksum.

@pytest.mark.parametrize("change, message", [
    ({"vision_width": None}, r"config.json lacks vision_width"),
    ({"attention_layers": None}, r"config.json lacks attention_layers"),
    ({"vision_width": "128"}, r"config.json: vision_width must be a whole number, not '128'"),
    ({"input_view": 3}, r"config.json: input_view must be a str, not 3"),
    ({"hidden_width": 7}, r"model.safetensors does not match .*config.json: mapping.0.0.weight is"),
])
def test_a_mapper_config_that_lies_is_named_with_its_field(tiny, tmp_path, change, message):
    folder = tmp_path / "mapper"
    GlobalMapper.from_components(tiny).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in change.items():
        config.pop(key) if value is None else config.__setitem__(key, value)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        GlobalMapper.from_pretrained(folder)


def test_saved_weights_carry_a_checksum_that_refuses_a_damaged_file(tiny, tmp_path):
    folder = tmp_path / "mapper"
    GlobalMapper.from_components(tiny).save_pretrained(folder)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the last tensor: still a readable safetensors file
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is damaged: its tensors do not match the checksum"):
        GlobalMapper.from_pretrained(folder)
    assert GlobalMapper.from_pretrained(ASSETS_DIR / "toy-global-mapper")  # saved without one: loads as before


# --------------------------------------------------------------------------------------------------
# Reading a capture: rows, heads and token positions inside what was captured.

def test_word_and_gate_maps_refuse_what_was_not_captured():
    from test_attention_plots import synthetic_capture

    from elite_tutorial.attention_maps import AttentionCapture
    from elite_tutorial.attention_plots import gate_map, word_map
    capture = synthetic_capture()
    for arguments, message in ((dict(positions=[3], row=2), "row 2 is outside what was captured: 2 rows"),
                               (dict(positions=[3], head=5), "head 5 is outside what was captured: 2 heads"),
                               (dict(positions=[77]), "token position 77 is outside .* 77 prompt positions"),
                               (dict(positions=[-1]), "token position -1 is outside"),
                               (dict(positions=[]), "positions is empty")):
        with pytest.raises(ValueError, match=message):
            word_map(capture, **arguments)
    with pytest.raises(ValueError, match="head 2 is outside"):
        gate_map(capture, head=2)
    with pytest.raises(ValueError, match="row 1 is outside what was captured: 1 rows of the local branch"):
        gate_map(capture, row=1)
    with pytest.raises(ValueError, match="Nothing was recorded"):
        word_map(AttentionCapture(), [3])


# --------------------------------------------------------------------------------------------------
# Every public entry point, given None, [], '', 0, -1, NaN, inf or a missing path: an error raised by
# this package that names the argument, or a result.

ODD_VALUES = [None, [], "", 0, -1, math.nan, math.inf, "no/such/path.png"]


def entry_points(pipe):
    from elite_tutorial.attention_maps import capture_cross_attention, load_capture
    from elite_tutorial.explorer import AttentionExplorer
    concept = pipe.encode(picture())
    steps = dict(num_inference_steps=1)
    return {  # name -> (call, words one of which the message must hold)
        "load_components": (lambda v: load_components(v, device="cpu"), ("preset", "preset_or_path")),
        "GlobalMapper.from_pretrained": (GlobalMapper.from_pretrained, ("pretrained_model_name_or_path", "folder")),
        "LocalMapper.from_official": (LocalMapper.from_official, ("checkpoint",)),
        "load_image": (load_image, ("image",)),
        "load_mask": (load_mask, ("mask",)),
        "concept_folder": (concept_folder, ("folder",)),
        "encode(image)": (pipe.encode, ("image",)),
        "encode(mask)": (lambda v: pipe.encode(picture(), v), ("mask",)),
        "pipe(prompt)": (lambda v: pipe(v, concept, **steps), ("prompt",)),
        "pipe(concept)": (lambda v: pipe("a photo of a S", v, **steps), ("concept",)),
        "pipe(token_index)": (lambda v: pipe("a photo of a S", concept, token_index=v, **steps), ("token_index",)),
        "pipe(generator)": (lambda v: pipe("a photo of a S", concept, generator=v, **steps), ("generator",)),
        "pipe(local_scale)": (lambda v: pipe("a photo of a S", concept, local_scale=v, **steps), ("local_scale",)),
        "capture_cross_attention": (lambda v: capture_cross_attention(v).__enter__(), ("capture_cross_attention",)),
        "load_capture": (load_capture, ("path",)),
        "AttentionExplorer": (lambda v: AttentionExplorer(pipe, v), ("concepts",)),
    }


@pytest.mark.parametrize("value", ODD_VALUES, ids=repr)
def test_every_entry_point_names_the_argument_or_handles_odd_values(pipe, value):
    import traceback
    for name, (call, argument_names) in entry_points(pipe).items():
        try:
            call(value)
        except (TypeError, ValueError, FileNotFoundError) as error:
            origin = traceback.extract_tb(error.__traceback__)[-1].filename
            assert "elite_tutorial" in origin, f"{name}({value!r}) failed inside {origin}: {error}"
            assert any(w in str(error) for w in argument_names), f"{name}({value!r}) does not name its argument: {error}"



# --------------------------------------------------------------------------------------------------
# Round 2, a second catalogue: what a first pass over the entry points still let through.

def test_an_image_without_pixels_is_refused():
    for image in (np.zeros((0, 0, 3), np.uint8), np.zeros((4, 0), np.uint8), Image.new("RGB", (0, 5))):
        with pytest.raises(ValueError, match="no pixels"):
            load_image(image)


def test_an_unknown_output_type_is_refused_not_replaced(pipe):
    """diffusers warns and returns numpy for output_type='jpeg'; a user asking for a file type gets told."""
    concept = pipe.encode(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"output_type must be one of \('pil', 'np', 'pt', 'latent'\), not 'jpeg'"):
        pipe("a photo of a S", concept, num_inference_steps=1, output_type="jpeg")


def test_capture_tokens_are_refused_when_empty_or_past_the_prompt_before_generating(pipe):
    from elite_tutorial.attention_maps import AttentionCapture, capture_cross_attention
    for tokens in ([], [-1], [True], "0", [1.5]):
        with pytest.raises(ValueError, match="tokens must be None"):
            AttentionCapture(tokens)
    assert AttentionCapture(np.array([2, 3])).tokens == [2, 3] and AttentionCapture(torch.tensor([4])).tokens == [4]
    assert AttentionCapture(range(2)).tokens == [0, 1] and AttentionCapture((5,)).tokens == [5]
    with pytest.raises(ValueError, match=r"tokens \[500\] reach past a prompt's 77 token positions"):
        with capture_cross_attention(pipe, tokens=[500]):
            pass
    unet = pipe.components.unet  # a bare UNet: the prompt's length is known at its first call
    with pytest.raises(ValueError, match=r"tokens \[80\] reach past a prompt's 77 token positions"):
        with capture_cross_attention(unet, tokens=[80]), torch.no_grad():
            unet(torch.zeros(1, 4, 16, 16), 0, encoder_hidden_states=torch.zeros(1, 77, unet.config.cross_attention_dim))


def test_a_local_scale_without_a_local_mapper_is_refused_not_ignored(tiny, pipe):
    global_only = ELITEPipeline(tiny, pipe.global_mapper)
    concept = global_only.encode(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="local_scale=0.5 asks for the local branch, but this pipeline has no LocalMapper"):
        global_only("a photo of a S", concept, local_scale=0.5, num_inference_steps=1, output_type="np")
    global_only("a photo of a S", concept, local_scale=0, num_inference_steps=1, output_type="np")  # off: allowed


def test_starting_latents_of_the_wrong_shape_are_refused(pipe):
    """diffusers starts from any latents it is given and returns images of their size."""
    concept = pipe.encode(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"latents must be a tensor of shape \(2, 4, 16, 16\) .* not \(1, 4, 3, 3\)"):
        pipe("a photo of a S", concept, latents=torch.zeros(1, 4, 3, 3), num_images_per_prompt=2, num_inference_steps=1)
    images = pipe("a photo of a S", concept, latents=torch.zeros(2, 4, 16, 16), num_images_per_prompt=2, num_inference_steps=1,
                  output_type="np").images
    assert images.shape == (2, 32, 32, 3)


def test_an_overlay_of_a_broken_map_is_refused():
    from elite_tutorial.attention_plots import overlay
    with pytest.raises(ValueError, match="finite .* NaN or infinite"):
        overlay(np.zeros((8, 8, 3), np.uint8), torch.full((4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"got shape \(4,\)"):
        overlay(np.zeros((8, 8, 3), np.uint8), torch.ones(4))
