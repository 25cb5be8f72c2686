"""The closed vocabulary of SynthMotion and toy captions: the tiny teachers' whole-word tokens.

The tiny CogVideoX (T5, Unigram) and tiny AnimateDiff (CLIP, BPE) tokenizers
give each word listed here a token of its own, so a whole caption fits their
text windows and a motion word ("left", "spins") is one embedding, not a run
of characters (see ``vidalign.motionenhancer.cogvideox.tiny_t5_tokenizer`` and
``vidalign.vda.tokenizer.tiny_clip_tokenizer``).

Why a literal list and not one derived from ``vidalign.data.synth``: about
half the caption words live in f-strings, not tables (``"first"``,
``"reversing direction"``, ``"times"``, ``"steadily"``), and the tables also
hold words no caption writes (``"pause"``, ``"drift"``). More importantly a
tokenizer's vocabulary fixes the ids a trained text encoder reads; it must not
change because someone reworded a caption. A change here is deliberate: bump
:data:`CAPTION_VOCAB_VERSION` (a test pins the version to the list's digest; the
CLIP tokenizer's cache is keyed on the content anyway), and retrain or keep the
saved teachers (they load their own saved tokenizers). The same test file
generates captions and fails when one holds a word missing from this list, so
a caption change in ``synth.py`` is caught rather than silently tokenised
character by character.

Words are lowercase; sentence-initial capitals (``"The"``, ``"An"``) are the
tokenizers' business (CLIP lowercases its input; the T5 vocabulary adds a
capitalised piece per word). Punctuation is not listed: both tokenizers keep
``","`` and ``"."`` as single-character tokens.
"""

from __future__ import annotations

CAPTION_VOCAB_VERSION = 1
"""Bump when :data:`CAPTION_WORDS` changes."""

CAPTION_WORDS: tuple[str, ...] = (
    # Function words of the caption templates.
    "a", "an", "and", "in", "on", "the", "first", "then",
    # Colours: synth.COLORS (toy.SQUARE_COLORS + cyan, pink).
    "red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink",
    # Backgrounds: synth.BACKGROUNDS shades, toy.BACKGROUND_COLORS, synth.TEXTURES.
    "gray", "light", "dark", "black", "white",
    "plain", "checkered", "striped", "dotted", "background",
    # Shapes: synth.SHAPES.
    "circle", "square", "triangle", "cross", "ring", "bar",
    # Motions: the actor's actions, the repeater and the steady object (synth._motion_sentence).
    "slides", "spins", "place", "stays", "still", "grows", "larger", "shrinks",
    "moves", "steadily", "back", "forth", "horizontally", "vertically",
    "reversing", "direction", "once", "times",
    # Directions: synth.DIRECTIONS.
    "left", "right", "up", "down",
    # Camera.
    "camera", "pans",
    # Reversal counts ("reversing direction 3 times"; 1 is "once").
    "2", "3", "4",
)
"""Every word a SynthMotion or toy caption writes, lowercase, grouped by what it names."""
