"""A few steps of each pretraining stage on CPU: losses fall, resuming is exact, the output loads."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import CLIPModel

from elite_tutorial import load_components
from elite_tutorial.studies import pretrain as P
from elite_tutorial.toyworld.judge import ToyJudge
from elite_tutorial.toyworld.models import toy_tokenizer
from elite_tutorial.train_loop import StepBatches, with_noise_seed

pytestmark = pytest.mark.research  # the pretraining study: `make test-research`

RECIPE = replace(P.PROFILES["smoke"], pool_size=256, clip_steps=40, clip_batch=16, vae_steps=40, vae_batch=8,
                 unet_steps=40, unet_batch=16, judge_steps=40, judge_batch=32, warmup_steps=5,
                 checkpoint_every=1000)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pool():
    return P.ScenePool(0, RECIPE.pool_size, processes=1)


def falls(history, key, by=0.8):
    """The mean of the last 8 losses is below `by` times the mean of the first 8."""
    losses = [h[key] for h in history]
    return np.mean(losses[-8:]) < by * np.mean(losses[:8])


def test_clip_vae_unet_losses_fall(pool, tmp_path):
    tokenizer = toy_tokenizer()
    clip, history = P.train_clip(pool, tokenizer, RECIPE, tmp_path, CPU)
    assert falls(history, "loss_contrastive", by=0.97)  # in-batch contrastive loss is noisy
    vae, history = P.train_vae(pool, RECIPE, tmp_path, CPU)
    assert falls(history, "loss_mse")
    assert vae.config.scaling_factor > 0
    clip.save_pretrained(tmp_path / "clip")
    text_encoder = load_text_encoder(tmp_path / "clip")
    _, history = P.train_unet(pool, tokenizer, text_encoder, vae, RECIPE, tmp_path, CPU)
    assert falls(history, "loss_noise")


def load_text_encoder(folder):
    from transformers import CLIPTextModel
    return CLIPTextModel.from_pretrained(folder)


def test_judge_loss_falls(tmp_path):
    _, history = P.train_judge(RECIPE, tmp_path, CPU)
    assert falls(history, "loss_position") and falls(history, "loss_colour")


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    recipe = replace(RECIPE, judge_steps=6, checkpoint_every=1000)
    straight, _ = P.train_judge(recipe, tmp_path / "a", CPU)
    P.train_judge(recipe, tmp_path / "b", CPU, stop_after=3)  # "crash" after 3 steps
    assert (tmp_path / "b" / "judge.checkpoint.safetensors").exists()
    # a crash between writing the loss history and replacing the checkpoint leaves extra history
    history_file = tmp_path / "b" / "judge.history.json"
    history_file.write_text(history_file.read_text()[:-1] + ', {"loss_shape": 9.0}]')
    resumed, history = P.train_judge(recipe, tmp_path / "b", CPU)
    assert len(history) == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_whole_command_writes_loadable_folders(tmp_path):
    P.main(["--profile", "smoke", "--out", str(tmp_path / "toy-sd"), "--eval-out", str(tmp_path / "toy-eval"), "--device", "cpu"])
    components = load_components(tmp_path / "toy-sd", device="cpu")
    assert components.unet.config.cross_attention_dim == components.text_encoder.config.hidden_size
    assert components.unet.dtype == torch.float32  # stored in fp16, loaded as asked
    ToyJudge.from_pretrained(tmp_path / "toy-eval" / "judge")
    CLIPModel.from_pretrained(tmp_path / "toy-eval" / "clip")
    assert not (tmp_path / "toy-sd.work").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy-eval", "toy-sd"]
    with pytest.raises(FileExistsError):
        P.main(["--profile", "smoke", "--out", str(tmp_path / "toy-sd"), "--eval-out", str(tmp_path / "x")])


def test_resuming_with_another_recipe_is_refused(tmp_path):
    work = tmp_path / "toy-sd.work"
    work.mkdir()
    (work / "recipe.json").write_text('{"seed": 1}')
    with pytest.raises(ValueError, match="another recipe"):
        P.pretrain(tmp_path / "toy-sd", tmp_path / "toy-eval", P.PROFILES["smoke"], "cpu")


def test_loader_workers_build_the_batches_built_inline(pool):
    """Batches depend on the step alone, so workers building them ahead change nothing."""
    tokenizer = toy_tokenizer()

    def make_batch(rng):
        index = rng.integers(len(pool), size=4)
        texts = [P.caption(pool.specs[i], rng, 0.3) for i in index]
        return {"pixels": pool.pixels(index), "input_ids": P.tokenize(tokenizer, texts)}

    batches = StepBatches(with_noise_seed(make_batch), key=lambda step, _: (0, P.STAGES.index("clip"), step), start=3, end=9)
    inline = [batches[k] for k in range(len(batches))]
    loaded = list(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2))
    assert len(loaded) == 6
    for a, b in zip(inline, loaded):
        assert a["seed"] == b["seed"]
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(inline[0]["pixels"], inline[1]["pixels"])


def test_pool_cache_is_reused(tmp_path):
    cache = tmp_path / "pool.npy"
    first = P.ScenePool(7, 32, processes=1, cache=cache)
    assert cache.exists()
    second = P.ScenePool(7, 32, processes=1, cache=cache)
    assert isinstance(second.images, np.memmap) and np.array_equal(first.images, second.images)


def test_stages_run_as_separate_commands_then_finish(tmp_path):
    base = ["--profile", "smoke", "--out", str(tmp_path / "toy-sd"), "--eval-out", str(tmp_path / "toy-eval"), "--device", "cpu"]
    with pytest.raises(RuntimeError, match="needs the clip stage"):
        P.main(base + ["--stages", "unet"])
    for stage in ("judge", "clip", "vae"):  # what three processes would do at once on a GPU
        P.main(base + ["--stages", stage])
        assert not (tmp_path / "toy-sd").exists()
    P.main(base)  # finds the three done, trains the UNet, writes the folders
    log = json.loads((tmp_path / "toy-sd" / "pretrain_log.json").read_text())
    assert set(log["seconds"]) == {"render_pool", "clip", "vae", "unet", "judge", "total"}
    assert any(command.endswith("--stages judge") for command in log["commands"])
    with pytest.raises(SystemExit):
        P.main(base + ["--stages", "clip,decoder"])


def test_shape_contrast_group_varies_the_shape_alone():
    group = P.shape_contrast_group(np.random.default_rng(3))
    assert [spec.objects[0].shape for spec in group] == list(P.SHAPES)
    for spec in group:
        assert spec.background == group[0].background and spec.texture_seed == group[0].texture_seed
        assert replace(spec.objects[0], shape="circle") == replace(group[0].objects[0], shape="circle")
    images = [P.render(spec)[0] for spec in group]
    assert all(not np.array_equal(images[0], image) for image in images[1:])


def test_clip_batches_with_shape_groups(pool, tmp_path, monkeypatch):
    """Groups take their place at the end of the batch; a recipe without groups keeps its batches."""
    tokenizer = toy_tokenizer()
    grouped = replace(RECIPE, clip_steps=3, clip_batch=16, clip_shape_groups=2)
    captured = {}

    def capture(name, model, make_batch, *args, **kwargs):
        captured[name] = make_batch
        return []

    monkeypatch.setattr(P, "train_loop", capture)
    P.train_clip(pool, tokenizer, grouped, tmp_path, CPU)
    batch = captured["clip"](np.random.default_rng(0))
    P.train_clip(pool, tokenizer, replace(grouped, clip_shape_groups=0), tmp_path, CPU)
    plain = captured["clip"](np.random.default_rng(0))
    assert batch["pixel_values"].shape == plain["pixel_values"].shape == (16, 3, P.SIZE, P.SIZE)
    assert batch["input_ids"].shape[0] == 16
    # without groups, the batch is the one built before groups existed: 16 pool scenes, then their captions
    rng = np.random.default_rng(0)
    index = rng.integers(len(pool), size=16)
    texts = [P.caption(pool.specs[i], rng, grouped.caption_drop) for i in index]
    assert torch.equal(plain["pixel_values"], P.clip_normalise(pool.pixels(index)))
    assert torch.equal(plain["input_ids"], P.tokenize(tokenizer, texts, padding="longest"))
    # the six pool images come first and are the ones the plain recipe draws first
    assert torch.equal(batch["pixel_values"][:6], plain["pixel_values"][:6])
    captions = tokenizer.batch_decode(batch["input_ids"][6:], skip_special_tokens=True)
    for group in (captions[:5], captions[5:]):
        assert [next(s for s in P.SHAPES if s in text.split()) for text in group] == list(P.SHAPES)
    with pytest.raises(ValueError, match="more than the batch"):
        P.train_clip(pool, tokenizer, replace(grouped, clip_shape_groups=4), tmp_path, CPU)


def test_clip_options_set_the_steps_and_the_vision_grid(tmp_path):
    """`--clip-patch-size 4` trains (and saves) a vision tower on a 16 x 16 patch grid; `--clip-steps 3`
    runs three steps; both land in the recorded recipe."""
    P.main(["--profile", "smoke", "--stages", "clip", "--clip-patch-size", "4", "--clip-steps", "3", "--device", "cpu",
            "--out", str(tmp_path / "toy-sd"), "--eval-out", str(tmp_path / "toy-eval")])
    clip = CLIPModel.from_pretrained(tmp_path / "toy-sd.work" / "clip.done")
    assert clip.config.vision_config.patch_size == 4
    states = clip.vision_model(pixel_values=torch.zeros(1, 3, P.SIZE, P.SIZE)).last_hidden_state
    assert states.shape[1] == 1 + (P.SIZE // 4) ** 2
    recipe = json.loads((tmp_path / "toy-sd.work" / "recipe.json").read_text())
    assert recipe["clip_patch_size"] == 4 and recipe["clip_steps"] == 3
    assert len(json.loads((tmp_path / "toy-sd.work" / "clip.history.json").read_text())) == 3


def test_loader_workers_follow_the_batch_cost(monkeypatch):
    monkeypatch.setattr(P.os, "cpu_count", lambda: 16)
    assert P._loader_workers(CPU) == P._loader_workers(CPU, renders=True) == 0  # the CPU trains
    gpu = torch.device("cuda")
    assert P._loader_workers(gpu) == 4
    assert P._loader_workers(gpu, renders=True) == 15  # shape groups render as the batches are built
