import pytest
import torch

from elite_tutorial.words import encode_prompts_with_words, tokenize_with_placeholder, word_norm_ratio


def embedding_of(components, word):
    (token,) = components.tokenizer(word, add_special_tokens=False).input_ids
    return components.text_encoder.get_input_embeddings().weight[token]


def plain_encoding(components, prompts):
    ids = components.tokenizer(prompts, padding="max_length", return_tensors="pt").input_ids
    return components.text_encoder(ids).last_hidden_state


def test_injecting_a_tokens_own_embedding_reproduces_the_plain_prompt(tiny):
    words = embedding_of(tiny, "dog")[None]  # (1 word, width)
    injected = encode_prompts_with_words("a photo of a S", words, tiny.tokenizer, tiny.text_encoder)
    assert torch.equal(injected, plain_encoding(tiny, ["a photo of a dog"]))


def test_batched_multi_word_injection_matches_plain_prompts(tiny):
    dog, cat, red = (embedding_of(tiny, w) for w in ("dog", "cat", "red"))
    words = torch.stack([torch.stack([dog, cat]), torch.stack([red, dog])])  # (2, 2, width)
    prompts = ["a photo of a S", "S on the left"]
    injected = encode_prompts_with_words(prompts, words, tiny.tokenizer, tiny.text_encoder)
    assert injected.shape == (2, 77, tiny.text_encoder.config.hidden_size)
    assert torch.equal(injected, plain_encoding(tiny, ["a photo of a dog cat", "red dog on the left"]))


def test_placeholder_found_in_token_ids_after_a_multi_token_word(tiny):
    # "close-up" is three tokens (close, -, up): a whitespace word count would put S one place early.
    ids, start = tokenize_with_placeholder(tiny.tokenizer, ["a close-up photo of S"], num_words=3)
    placeholder = tiny.tokenizer("S", add_special_tokens=False).input_ids[0]
    row = ids[0].tolist()
    assert row[start[0]:start[0] + 3] == [placeholder] * 3
    assert row.count(placeholder) == 3
    assert start[0] > 5  # start token + a + close-up pieces + photo + of


def test_gradients_reach_the_injected_words(tiny):
    words = torch.randn(2, 5, tiny.text_encoder.config.hidden_size, requires_grad=True)
    out = encode_prompts_with_words("a photo of a S", words, tiny.tokenizer, tiny.text_encoder)
    out.square().mean().backward()
    assert words.grad is not None
    assert (words.grad.abs().sum(dim=-1) > 0).all()  # every word of every row gets a gradient


def test_hook_is_removed_afterwards_even_on_error(tiny):
    embedding = tiny.text_encoder.get_input_embeddings()
    assert not embedding._forward_hooks
    encode_prompts_with_words("a S", torch.zeros(1, 32), tiny.tokenizer, tiny.text_encoder)
    with pytest.raises(ValueError):
        encode_prompts_with_words("no placeholder here", torch.zeros(1, 32), tiny.tokenizer, tiny.text_encoder)
    assert not embedding._forward_hooks


@pytest.mark.parametrize(
    "prompts, shape, message",
    [
        ("a photo of a dog", (1, 1, 32), "does not contain the placeholder"),
        ("S and S", (1, 1, 32), "2 times"),
        ("a " * 72 + "S", (1, 5, 32), "79 tokens .* at most 77"),
        ("a photo of a S", (1, 1, 16), "16 wide"),
        (["a S", "a S", "a S"], (2, 1, 32), "3 prompts for a batch of 2"),
        ("a S", (32,), "shape"),
    ],
)
def test_bad_input_raises_a_clear_error(tiny, prompts, shape, message):
    with pytest.raises(ValueError, match=message):
        encode_prompts_with_words(prompts, torch.zeros(shape), tiny.tokenizer, tiny.text_encoder)


def test_multi_token_placeholder_is_refused(tiny):
    with pytest.raises(ValueError, match="single token"):
        encode_prompts_with_words("a zigzag", torch.zeros(1, 32), tiny.tokenizer, tiny.text_encoder, placeholder="zigzag")


def test_word_norm_ratio_compares_each_word_with_the_mean_vocabulary_norm():
    vocabulary = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5 and 1: mean 3
    words = torch.tensor([[[6.0, 8.0], [0.0, 3.0]], [[0.0, 0.0], [1.5, 0.0]]])  # (2, 2 words, width)
    torch.testing.assert_close(word_norm_ratio(words, vocabulary), torch.tensor([[10 / 3, 1.0], [0.0, 0.5]]))
    assert word_norm_ratio(vocabulary[0], vocabulary).shape == ()
