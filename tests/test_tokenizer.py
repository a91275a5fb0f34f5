from transformers import CLIPTokenizer

from elite_tutorial.toyworld.tokenizer import build_clip_tokenizer, learn_merges

WORDS = ["a", "photo", "of", "red", "green", "striped", "circle", "close-up", "S"]


def test_every_listed_word_is_one_token():
    tokenizer = build_clip_tokenizer(WORDS)
    for word in ["a", "photo", "of", "red", "green", "striped", "circle", "close", "up", "s"]:
        assert tokenizer.tokenize(word) == [word + "</w>"], word


def test_round_trip_including_unknown_words():
    tokenizer = build_clip_tokenizer(WORDS)
    text = "a photo of a zigzag green circle, close-up 42"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a zigzag green circle , close - up 4 2"
    assert len(tokenizer.tokenize("zigzag")) > 1  # unknown word falls apart into pieces


def test_merges_depend_only_on_the_word_set():
    assert learn_merges(WORDS) == learn_merges(list(reversed(WORDS)) + WORDS)


def test_save_and_load_with_transformers(tmp_path):
    tokenizer = build_clip_tokenizer(WORDS)
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a photo of a S, striped"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.model_max_length == 77 and loaded.pad_token == "<|endoftext|>"
