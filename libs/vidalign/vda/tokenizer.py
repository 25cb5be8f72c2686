"""An offline CLIP tokenizer for the tiny teacher presets.

Real teachers load SD1.5's ``tokenizer/`` folder. Tiny presets must work with no
network and no downloaded files, so this module synthesises the files of a real
``CLIPTokenizer`` instead: a byte-level vocabulary (every byte, alone and as a
word end) and no BPE merges. Text is then tokenised one byte per token, which is
enough for the tiny text encoder and keeps the same tokenizer class, special
tokens and padding behaviour as SD1.5.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

from vidalign.cache import cache_root

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
TINY_MODEL_MAX_LENGTH = 77
"""Tokens per caption for tiny presets, as in SD1.5. The tokenizer is byte-level
(one token per character), so 77 holds a 75-character caption."""

# Bump when the generated files change, so an old cache directory is not reused.
_TOKENIZER_DIR = "clip-bytes-v1"


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


def byte_level_vocab() -> dict[str, int]:
    """CLIP's vocabulary layout without merges: bytes, bytes + ``</w>``, then BOS and EOS."""
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(char + END_OF_WORD for char in chars), BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


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
    """A real ``CLIPTokenizer`` over the byte-level vocabulary, from files cached on disk.

    Loaded with ``from_pretrained`` on the generated ``vocab.json`` / ``merges.txt``,
    the code path SD1.5's tokenizer folder takes. (transformers 5's ``CLIPTokenizer``
    constructor ignores ``vocab_file=``/``merges_file=`` and would silently build a
    3-token vocabulary.)
    """
    directory = cache_root() / "tokenizers" / _TOKENIZER_DIR
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    if not (vocab_path.is_file() and merges_path.is_file()):
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(vocab_path, json.dumps(byte_level_vocab(), ensure_ascii=False))
        _write_atomically(merges_path, "#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(directory, model_max_length=model_max_length)
