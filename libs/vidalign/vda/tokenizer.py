"""An offline CLIP tokenizer for the tiny teacher presets.

Real teachers load SD1.5's ``tokenizer/`` folder. Tiny presets must work with no
network and no downloaded files, so this module synthesises the files of a real
``CLIPTokenizer`` instead, in CLIP's own layout: every byte alone and as a word
end (``"x</w>"``), then the tokens that BPE merges build, then BOS and EOS.

The merges are learned here, deterministically, from SynthMotion's closed
caption vocabulary (:data:`vidalign.data.synth_vocab.CAPTION_WORDS`), so each
caption word is one token and a whole caption (at most 70 words and punctuation
marks) fits SD1.5's 77-token window with BOS and EOS. Any other text still
tokenises: it falls back to whatever sub-words the merges build, down to single
bytes. The tokenizer class, special tokens and padding behave as SD1.5's.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

from transformers import CLIPTokenizer

from vidalign.cache import cache_root
from vidalign.data.synth_vocab import CAPTION_WORDS

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
TINY_MODEL_MAX_LENGTH = 77
"""Tokens per caption for tiny presets, as in SD1.5. With one token per caption word,
the longest SynthMotion caption (70 words and punctuation marks) takes 72 with BOS/EOS."""

# Bump when the generated files change in a way their content digest would not show
# (the cache directory is also keyed on that digest, so an edited word list never
# reuses stale files).
_TOKENIZER_DIR = "clip-words-v2"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable unicode characters.

    Byte-level BPE (GPT-2, CLIP) never sees raw control or whitespace bytes: each
    byte is shown as one printable character, and the vocabulary is written in
    those characters.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    shifted = 0
    byte_values = list(printable)
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            chars.append(256 + shifted)
            shifted += 1
    return {byte: chr(char) for byte, char in zip(byte_values, chars, strict=True)}


def _word_symbols(word: str) -> list[str]:
    """A word as CLIP's BPE starts from it: one symbol per byte, the last marked ``</w>``."""
    byte_char = bytes_to_unicode()
    symbols = [byte_char[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    return symbols


def _apply_merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """``symbols`` with every non-overlapping occurrence of ``pair`` merged, left to right."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges, in rank order, that turn each of ``words`` into a single token.

    BPE training on the word list (each word once) run to completion: merge the
    most frequent adjacent pair (ties: the smallest pair, so the result never
    depends on dict order), until no word has two symbols left. Learned merges,
    unlike independent per-word merge chains, cannot conflict: a chain's first
    merge ("r" + "e" of "red") would fire inside another word ("green") and
    leave it in pieces. Applying the merges by rank, as the tokenizer does,
    replays training and ends at one token per word (the tests check this on
    the real tokenizer).
    """
    pieces = [_word_symbols(w) for w in dict.fromkeys(words) if w]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for symbols in pieces for pair in pairwise(symbols))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        pieces = [_apply_merge(symbols, best) for symbols in pieces]


def word_level_vocab(merges: Iterable[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes + ``</w>``, each merge's result in rank order,
    then BOS and EOS (the last two ids, as in SD1.5's 49406 and 49407)."""
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(char + END_OF_WORD for char in chars)]
    tokens += dict.fromkeys(left + right for left, right in merges)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def tokenizer_files(words: Iterable[str] = CAPTION_WORDS) -> dict[str, str]:
    """The text of ``vocab.json`` and ``merges.txt`` for a CLIP tokenizer whose words are one token."""
    merges = learn_word_merges(words)
    return {
        "vocab.json": json.dumps(word_level_vocab(merges), ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
    }


def _write_atomically(path: Path, text: str) -> None:
    # Several processes (test workers, service replicas) may build the tokenizer at
    # once; os.replace makes each file appear whole or not at all.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tiny_clip_tokenizer(model_max_length: int = TINY_MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` over the word-level vocabulary, from files cached on disk.

    Loaded with ``from_pretrained`` on the generated ``vocab.json`` / ``merges.txt``,
    the code path SD1.5's tokenizer folder takes. (transformers 5's ``CLIPTokenizer``
    constructor ignores ``vocab_file=``/``merges_file=`` and would silently build a
    3-token vocabulary.) The cache directory is named after a digest of the files,
    so a changed word list gets a directory of its own.
    """
    files = tokenizer_files()
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
    directory = cache_root() / "tokenizers" / f"{_TOKENIZER_DIR}-{digest}"
    if not all((directory / name).is_file() for name in files):
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            _write_atomically(directory / name, text)
    return CLIPTokenizer.from_pretrained(directory, model_max_length=model_max_length)
