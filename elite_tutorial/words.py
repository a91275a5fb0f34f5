"""Prompts with a placeholder word whose embedding is replaced by learnt word embeddings.

ELITE writes a prompt such as "a photo of a S" and swaps the token embedding of `S` for the words
its mapping network predicts (w0 alone at inference, w0..w4 during training). The placeholder is a
plain word (`S`, as the authors use); no tokenizer entry is added.

How: the prompt is tokenized with the placeholder repeated once per injected word, so every later
token (the end-of-text token included) moves right exactly as if N real words stood there; then a
forward hook on the text encoder's token-embedding layer overwrites those N rows with the given
embeddings. Everything after the embedding layer (positions, causal mask, layers, pooling) is the
unmodified `CLIPTextModel`, and gradients flow from the output back into the injected words.

The placeholder is found in the token ids, not by counting whitespace words as the authors' code
does (that is off by one whenever an earlier word splits into several tokens, e.g. "close-up"), and
only as a whole word: the last piece of a word split into several tokens ("bu" + "s" of "bus") is
not the placeholder.

A tokenizer built on a short word list (`toyworld.tokenizer`: the toy and tiny-random presets) has a
text encoder that learnt those words only; a prompt with any other word is refused, naming it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import CLIPTextModel, CLIPTokenizer

DEFAULT_PLACEHOLDER = "S"
END_OF_WORD = "</w>"  # CLIP's BPE marks the last token of every word with this suffix
CLIP_VOCABULARY_SIZE = 49408


def has_word_list_vocabulary(tokenizer: CLIPTokenizer) -> bool:
    """Whether `tokenizer` was built on a short word list (the toy world's) rather than CLIP's vocabulary.

    Such a tokenizer (a few hundred entries; CLIP's has 49,408) splits every word it was not built
    on into single characters, which its text encoder never learnt: a prompt would be silently
    wrong. Real CLIP also splits rare words, but into pieces its encoder did learn.
    """
    return len(tokenizer) < CLIP_VOCABULARY_SIZE // 10


def word_spans(tokenizer: CLIPTokenizer, ids: list[int]) -> list[range]:
    """The positions in `ids` of each word's tokens, start- and end-of-text tokens left out.

    `ids` is a tokenized prompt with its special tokens; a word ends at a token that ends with
    `</w>` ("bus" may be "b", "u", "s</w>"; "close-up" is three words: "close", "-", "up").
    """
    tokens = tokenizer.convert_ids_to_tokens(ids)
    spans, start = [], 1
    for i in range(1, len(ids) - 1):
        if tokens[i].endswith(END_OF_WORD):
            spans.append(range(start, i + 1))
            start = i + 1
    return spans


def _check_known_words(tokenizer: CLIPTokenizer, prompt: str, ids: list[int], spans: list[range]) -> None:
    """Raise, naming them, if a word-list tokenizer splits some of the prompt's words (it lacks them)."""
    if not has_word_list_vocabulary(tokenizer):
        return
    unknown = [tokenizer.decode(ids[s.start:s.stop]).strip() for s in spans if len(s) > 1]
    if unknown:
        raise ValueError(
            f"The prompt {prompt!r} has word(s) this tokenizer's vocabulary lacks: "
            f"{', '.join(repr(w) for w in dict.fromkeys(unknown))}. It was built on the toy world's words "
            "(shapes, colours, patterns, sizes, positions, backgrounds, the training templates) and would "
            "split any other word into characters its text encoder never learnt; rephrase with known words."
        )


def check_known_words(tokenizer: CLIPTokenizer, prompt: str) -> None:
    """Raise, naming them, if a word-list tokenizer lacks some of `prompt`'s words (a negative prompt,
    a plain prompt): the same check prompts with the placeholder get."""
    ids = tokenizer(prompt).input_ids
    _check_known_words(tokenizer, prompt, ids, word_spans(tokenizer, ids))


def placeholder_token_id(tokenizer: CLIPTokenizer, placeholder: str = DEFAULT_PLACEHOLDER) -> int:
    """The single token id of `placeholder` (raises if the tokenizer splits it)."""
    ids = tokenizer(placeholder, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(
            f"The placeholder {placeholder!r} is {len(ids)} tokens for this tokenizer; "
            "choose a placeholder that is a single token (the default 'S' is)."
        )
    return ids[0]


def tokenize_with_placeholder(
    tokenizer: CLIPTokenizer,
    prompts: list[str],
    num_words: int,
    placeholder: str = DEFAULT_PLACEHOLDER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with the placeholder repeated `num_words` times, and where it starts.

    Returns `input_ids` (batch, max_length), padded like diffusers pads prompts, and
    `start` (batch,): the position of the first placeholder token (the start-of-text token is
    position 0, so the first prompt word is position 1).
    """
    if num_words < 1:
        raise ValueError(f"num_words must be at least 1, got {num_words}.")
    placeholder_id = placeholder_token_id(tokenizer, placeholder)
    max_length = tokenizer.model_max_length
    rows, starts = [], []
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids  # with start- and end-of-text tokens
        spans = word_spans(tokenizer, ids)
        _check_known_words(tokenizer, prompt, ids, spans)
        # whole words only: the final "s" of a split word is not the placeholder "S"
        positions = [s.start for s in spans if len(s) == 1 and ids[s.start] == placeholder_id]
        if not positions:
            raise ValueError(f"The prompt {prompt!r} does not contain the placeholder word {placeholder!r}.")
        if len(positions) > 1:
            raise ValueError(
                f"The prompt {prompt!r} contains the placeholder word {placeholder!r} "
                f"{len(positions)} times; it must appear exactly once."
            )
        start = positions[0]
        ids = ids[:start] + [placeholder_id] * num_words + ids[start + 1:]
        if len(ids) > max_length:
            raise ValueError(
                f"The prompt {prompt!r} is {len(ids)} tokens once the placeholder is expanded to "
                f"{num_words} word(s); the text encoder takes at most {max_length}. Shorten the prompt."
            )
        rows.append(ids + [tokenizer.pad_token_id] * (max_length - len(ids)))
        starts.append(start)
    return torch.tensor(rows), torch.tensor(starts)


def word_norm_ratio(words: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
    """How many times the vocabulary's mean token norm each word's L2 norm is (1: the size of a
    typical word of the vocabulary).

    words: (..., width) word embeddings; token_embeddings: (vocabulary, width), the text encoder's
    token-embedding table (`text_encoder.get_input_embeddings().weight`). Returns (...,).
    """
    return words.norm(dim=-1) / token_embeddings.norm(dim=-1).mean()


@contextmanager
def injected_token_embeddings(text_encoder: CLIPTextModel, positions: torch.Tensor, words: torch.Tensor):
    """While active, the token-embedding layer's output at `positions` is replaced by `words`.

    positions: (batch, num_words) token positions; words: (batch, num_words, width).
    The hook is removed on exit, also when the body raises.
    """
    batch_index = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)

    def replace(module, inputs, output):  # output: (batch, seq, width)
        if output.shape[0] != positions.shape[0]:
            raise RuntimeError("injected_token_embeddings: the encoded batch is not the one the words were given for.")
        index = (batch_index.to(output.device), positions.to(output.device))
        return output.index_put(index, words.to(output.dtype))  # out of place: gradients reach `words`

    handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def encode_prompts_with_words(
    prompts: str | list[str],
    words: torch.Tensor,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    placeholder: str = DEFAULT_PLACEHOLDER,
) -> torch.Tensor:
    """Encode prompts whose placeholder is replaced by the given word embeddings.

    prompts: one prompt (used for every batch row) or a list of `batch` prompts.
    words: (batch, num_words, width) or (num_words, width) for a batch of one; `width` is the
        text encoder's hidden size (768 for sd14). All `num_words` words go where the placeholder
        was, in order (w0 first).
    Returns the prompt embeddings (batch, 77, width): `last_hidden_state`, what the UNet attends to.
    """
    if words.dim() == 2:
        words = words[None]
    if words.dim() != 3:
        raise ValueError(f"words must be (batch, num_words, width) or (num_words, width); got shape {tuple(words.shape)}.")
    batch, num_words, width = words.shape
    expected_width = text_encoder.config.hidden_size
    if width != expected_width:
        raise ValueError(
            f"The word embeddings are {width} wide but this text encoder's embeddings are "
            f"{expected_width} wide; the mapper and the components must come from the same preset."
        )
    if isinstance(prompts, str):
        prompts = [prompts] * batch
    if len(prompts) != batch:
        raise ValueError(f"Got {len(prompts)} prompts for a batch of {batch} word sets; give one prompt per row, or a single prompt.")
    input_ids, start = tokenize_with_placeholder(tokenizer, list(prompts), num_words, placeholder)
    positions = start[:, None] + torch.arange(num_words)
    device = text_encoder.device
    # non-blocking: a small copy from the host is staged at once, and the host need not wait for the GPU
    with injected_token_embeddings(text_encoder, positions.to(device, non_blocking=True), words.to(device)):
        return text_encoder(input_ids.to(device, non_blocking=True)).last_hidden_state


def compound_embeddings(components, phrases: list[str]) -> torch.Tensor:
    """(len(phrases), text_width): each phrase's compound word, the sum of its words' token embeddings
    in `components`' text encoder ("red dotted circle" -> one word, e(red) + e(dotted) + e(circle)),
    to write at the placeholder like any word (`encode_prompts_with_words`). Every word of a phrase
    must be a single token of the tokenizer's vocabulary (the toy world's words are)."""
    table = components.text_encoder.get_input_embeddings().weight.detach()
    ids = [components.tokenizer(phrase.split(), add_special_tokens=False).input_ids for phrase in phrases]
    if any(len(word) != 1 for phrase in ids for word in phrase):
        raise ValueError(f"Every word of {phrases} must be a single token of this tokenizer's vocabulary.")
    return torch.stack([table[[word[0] for word in phrase]].sum(0) for phrase in ids])
