"""A CLIP BPE tokenizer whose vocabulary is built here from the prompt words.

The base alphabet is CLIP's byte-level one (every byte, alone and word-final), so any text tokenizes; the
prompt words get merges that build each of them into a single word-final token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """CLIP/GPT-2's reversible byte -> printable-unicode map, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes, extra = [], 0
    for byte in range(256):
        if byte in printable:
            codes.append(byte)
        else:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and BPE merges that encode each of ``words`` (lower case) as one token."""
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + "</w>" for s in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        word = word.lower()
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            parts = [pair[0] + pair[1], *parts[2:]]
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def build_tokenizer(words: Iterable[str], max_length: int):
    """A ``transformers.CLIPTokenizer`` over ``words``, padded with the end token as CLIP does.

    Built from in-memory ``vocab``/``merges``: a transformers v5 constructor (hence ``transformers>=5.0`` in
    pyproject.toml; v4's tokenizer takes file paths)."""
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def save_tokenizer(tokenizer, words: Iterable[str], directory: Path) -> None:
    """``save_pretrained`` plus ``vocab.json``/``merges.txt``, so older (slow) CLIPTokenizers load it too."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    vocab, merges = build_vocab(words)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
