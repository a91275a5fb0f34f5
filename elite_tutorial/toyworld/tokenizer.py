"""A real `CLIPTokenizer` on a small vocabulary that this project builds itself.

CLIP's tokenizer is byte-level BPE: every text splits into words, every word into its UTF-8 bytes
(shown as printable characters), and a ranked list of merges glues byte pairs back into longer
pieces; a word-final piece carries the suffix ``</w>``. The real vocabulary (49,408 entries) must be
downloaded, so for the offline presets we *train* the merges on a short word list instead:

- the 256 byte symbols and their ``</w>`` forms are always in the vocabulary, so any text still
  tokenizes (unknown words fall apart into characters, exactly as rare words do in real CLIP);
- merges are learnt greedily (most frequent pair first) until every listed word is one symbol, so
  each listed word becomes exactly one token, as "dog" or "photo" are in the real vocabulary.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from transformers import CLIPTokenizer

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
END_OF_WORD = "</w>"
# CLIP's pre-tokenizer splits text into these pieces before BPE (letters, single digits, punctuation).
_PIECES = re.compile(r"[^\W\d_]+|\d|[^\s\w]+|_+")


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _symbols(word: str, byte_chars: dict[int, str]) -> tuple[str, ...]:
    pieces = [byte_chars[b] for b in word.encode("utf-8")]
    pieces[-1] += END_OF_WORD
    return tuple(pieces)


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Greedy BPE training until each distinct (lower-cased) word piece is a single symbol.

    Texts are first split the way CLIP splits them ("close-up" -> "close", "-", "up").

    Ties are broken by the pair itself, so the result depends only on the set of words.
    """
    byte_chars = _bytes_to_unicode()
    pieces = {piece for text in words for piece in _PIECES.findall(text.lower())}
    segmented = {_symbols(piece, byte_chars) for piece in pieces}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for word in segmented for p in zip(word, word[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        segmented = {_merge(word, best) for word in segmented}


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def build_clip_tokenizer(words: Iterable[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A `CLIPTokenizer` in which every word of `words` is one token.

    Save it with ``tokenizer.save_pretrained(folder)`` (writes ``vocab.json`` and ``merges.txt``)
    and load it back with ``CLIPTokenizer.from_pretrained(folder)``, like any Hub tokenizer.
    """
    merges = learn_merges(words)
    base = list(_bytes_to_unicode().values())
    tokens = base + [c + END_OF_WORD for c in base] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
    )
