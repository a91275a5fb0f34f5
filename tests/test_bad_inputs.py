"""Inputs a user can get wrong: each gets a clear error (naming the value and what to do) or is handled
correctly; nothing is silently wrong. Grouped by area; docs/bad-inputs.md lists them."""
import json
import math
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from elite_tutorial import load_components
from elite_tutorial import storage
from elite_tutorial.cli import main as elite_train
from elite_tutorial.components import ASSETS_DIR, default_device_and_dtype
from elite_tutorial.data import load_image, load_mask
from elite_tutorial.mappers import GlobalMapper, LocalMapper
from elite_tutorial.pipeline import ELITEPipeline
from elite_tutorial.storage import atomic_directory
from elite_tutorial.training import PROFILES
from elite_tutorial import words
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
])
def test_bad_sampling_arguments_are_refused(pipe, arguments, message):
    concept = pipe.encode(picture())
    with pytest.raises(ValueError, match=message):
        pipe("a photo of a S", concept, **arguments)


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
    ("--snr-gamma", "0", "finite number above 0, not 0"),
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
