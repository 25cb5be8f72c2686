"""Tokenizers for students built from scratch, and the ChatML conversation format.

Tiny presets need a tokenizer with a chat template and no download:
:func:`build_char_tokenizer` builds a character-level one on the fly with the
``tokenizers`` library (a BPE model with no merges over printable ASCII,
``Fuse`` decoder), wrapped in ``PreTrainedTokenizerFast``, its special tokens
given the ids the tiny config reserves (``<video>`` = 127, ...); the family
gives the specials and a Jinja chat template in the real model's format.
:func:`build_word_tokenizer` is the word-level variant for small models trained
on a closed vocabulary (the demo).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def build_char_tokenizer(
    special_ids: Mapping[str, int], vocab_size: int, chat_template: str, eos: str = "</s>"
) -> Any:
    """A character-level fast tokenizer (printable ASCII) with ``special_ids`` and a chat template.

    ``special_ids`` must name ``<unk>``, ``<s>``, ``</s>`` and ``<pad>``; other
    entries (``<video>``, ``<image>``) become special tokens too, so the chat
    template's placeholders are one token each. Other characters get the free
    ids from 0 up; unknown characters map to ``<unk>``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = dict(special_ids)
    free = (i for i in range(vocab_size) if i not in set(special_ids.values()))
    for code in range(32, 127):
        vocab[chr(code)] = next(free)
    vocab["\n"] = next(free)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_ids])
    extra = [t for t in special_ids if t not in ("<unk>", "<s>", "</s>", "<pad>")]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token=eos,
        pad_token="<pad>",
        extra_special_tokens={t.strip("<>"): t for t in extra} if extra else None,
    )
    fast.chat_template = chat_template
    return fast


def build_word_tokenizer(
    texts: Sequence[str],
    special_ids: Mapping[str, int],
    chat_template: str | None,
    eos: str = "</s>",
    bos: str = "<s>",
) -> Any:
    """A word-level fast tokenizer over the words (and punctuation marks) of ``texts``.

    For small models trained from scratch on a closed vocabulary (the demo's
    SynthMotion questions): a sentence is a dozen tokens instead of a few
    hundred characters, which makes training faster and the task learnable.
    Words split on whitespace and punctuation; ``special_ids`` keep their ids
    (as in :func:`build_char_tokenizer`), words take the free ids in sorted
    order, and a word never seen maps to ``<unk>``. The tokenizer is saved and
    loaded with the model like any ``PreTrainedTokenizerFast``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words: set[str] = set()
    for text in texts:
        for special in special_ids:
            text = text.replace(special, " ")
        words.update(piece for piece, _ in pre.pre_tokenize_str(text))
    vocab = dict(special_ids)
    taken = set(special_ids.values())
    free = (i for i in range(len(words) + len(special_ids) + max(taken) + 1) if i not in taken)
    for word in sorted(words - set(special_ids)):
        vocab[word] = next(free)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_ids])
    extra = [t for t in special_ids if t not in ("<unk>", bos, eos, "<pad>")]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token=bos,
        eos_token=eos,
        pad_token="<pad>",
        extra_special_tokens={t.strip("<>"): t for t in extra} if extra else None,
    )
    fast.chat_template = chat_template
    return fast


CHATML_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'video' -%}{{ VIDEO }}"
    "{%- elif item['type'] == 'image' -%}{{ IMAGE }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
"""ChatML (Qwen2.5-VL, InternVL3); ``VIDEO``/``IMAGE`` are replaced by the family's placeholders
(:func:`chatml_chat_template`). The real templates also add a default system message; the tiny
ones leave it out."""

CHATML_SPECIALS = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "<pad>": 3,
    "<|im_start|>": 120,
    "<|im_end|>": 121,
}
"""Special tokens (and tiny-config ids) of the ChatML families' tiny tokenizers."""


def chatml_chat_template(video: str, image: str) -> str:
    """:data:`CHATML_CHAT_TEMPLATE` with a family's video and image placeholders (Jinja)."""
    return CHATML_CHAT_TEMPLATE.replace("{{ VIDEO }}", video).replace("{{ IMAGE }}", image)


def chatml_text(
    *, specials: Mapping[str, int], video: str, image: str, placeholder: str, video_token: str
) -> dict[str, Any]:
    """The text fields of a ChatML :class:`~vidalign.students.StudentFamily`: the tiny
    tokenizer's specials (:data:`CHATML_SPECIALS` plus the family's ``specials``), its
    ``<|im_end|>`` eos, and the chat template with the family's ``video``/``image`` placeholders."""
    return {
        "tiny_specials": {**CHATML_SPECIALS, **specials},
        "tiny_eos": "<|im_end|>",
        "chat_template": chatml_chat_template(video=video, image=image),
        "placeholder": placeholder,
        "video_token": video_token,
    }
