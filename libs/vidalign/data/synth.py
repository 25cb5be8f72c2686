"""SynthMotion: procedural motion clips with captions and MotionBench-style questions.

The demo needs a motion benchmark that runs on a laptop and whose answers are
known exactly. Each clip is a small world on a torus (things leaving one edge
come back at the other) holding two to four sprites of distinct colour and
shape on a plain or textured background:

- the **actor** follows an ordered program of two or three actions, exactly one
  of them a slide in some direction (``slides right, then spins in place, then
  stays still``);
- the **repeater** moves back and forth along one axis, reversing direction a
  known number of times;
- the **steady** object (most clips) does one thing throughout: drifts, spins,
  grows, shrinks or stays still;
- an **extra** object (some clips) stays still;
- the **camera** stays still or pans, shifting the whole scene.

Questions follow MotionBench's six categories, plus static control questions
(colour, shape, number of objects) that need no motion at all:

========================  ==================================================
Motion Recognition        what the repeater / steady / extra object does
Location-related Motion   which way the actor slides (relative to the scene)
Action Order              the order of the actor's actions
Repetition Count          how many times the repeater reverses direction
Motion-related Objects    which object moves back and forth / changes what it
                          does partway / never moves
Camera Motion             how the camera moves
Static Attributes         colour, shape, object count (our extension)
========================  ==================================================

Why one frame cannot answer them (docs/design.md, "The demo"): start positions are
uniform on the torus and independent of every motion attribute, so a sprite's
position in any one frame says nothing about its direction; sizes and angles
are random, so growth and rotation cannot be read off one frame either; the
letter of the right option is drawn uniformly per question. Directions are
relative to the scene: when the camera pans, everything also shifts on screen.

Clip ``i`` of a seed draws from generators seeded with ``(seed, i, stream)``,
so it is the same bytes however many clips are generated, and a change to the
question wording does not change the pixels.

:func:`write_dataset` writes MotionBench's own layout (``video_info.meta.jsonl``
+ mp4 files) so the MotionBench loader reads SynthMotion and the real benchmark
alike. MotionBench puts ``question_type`` on the video line, so a clip gets one
line per category, keyed ``{clip_id}-{code}`` and sharing the clip's mp4; static
questions use the extra ``question_type`` ``"Static Attributes"``. Captions and
ground truth go to a sidecar, ``synthmotion.jsonl``.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vidalign.data.toy import SQUARE_COLORS, write_mp4
from vidalign.errors import InvalidInput, NotFound

MOTION_CATEGORIES = (
    "Motion Recognition",
    "Location-related Motion",
    "Action Order",
    "Repetition Count",
    "Motion-related Objects",
    "Camera Motion",
)
"""MotionBench's six question types, in its order."""

STATIC_CATEGORY = "Static Attributes"
"""Our extension: control questions answerable from any single frame."""

CATEGORY_CODES = {
    "Motion Recognition": "MR",
    "Location-related Motion": "LM",
    "Action Order": "AO",
    "Repetition Count": "RC",
    "Motion-related Objects": "MO",
    "Camera Motion": "CM",
    STATIC_CATEGORY: "SA",
}
"""Short codes used in MotionBench keys and result tables."""

COLORS: dict[str, tuple[int, int, int]] = {
    **SQUARE_COLORS,
    "cyan": (20, 200, 210),
    "pink": (240, 100, 180),
}
"""Sprite colours: saturated, so no background shade (always grey) equals one."""

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
SPINNABLE = ("square", "triangle", "cross", "bar")
"""Shapes whose rotation is visible; circles and rings never spin."""

BACKGROUNDS: dict[str, int] = {"gray": 128, "light gray": 200, "dark gray": 60}
"""Neutral background shades (R = G = B); textures add a second shade 40 apart."""

TEXTURES = ("plain", "checkered", "striped", "dotted")
DIRECTIONS = ("left", "right", "up", "down")
"""Image directions: "up" is towards row 0."""

ACTIONS = ("slide", "spin", "pause", "grow", "shrink")
"""What the actor can do in one segment of its program (exactly one slide)."""

STEADY_MOTIONS = ("drift", "spin", "grow", "shrink", "still")
"""What the steady object does for the whole clip."""

MOTION_TEXT = {
    "drift": "moves steadily in one direction",
    "spin": "spins in place",
    "back_and_forth": "moves back and forth",
    "grow": "grows larger",
    "shrink": "shrinks",
    "still": "stays still",
}
"""Option texts of Motion Recognition questions, one per whole-clip motion."""

ACTION_TEXT = {
    "slide": "slides",
    "spin": "spins in place",
    "pause": "stays still",
    "grow": "grows larger",
    "shrink": "shrinks",
}
"""Action Order phrases; "slides" has no direction so the order options do not
give away the Location-related Motion answer."""

CAMERA_TEXT = {
    "left": "it pans left",
    "right": "it pans right",
    "up": "it pans up",
    "down": "it pans down",
    None: "it stays still",
}
"""Camera Motion options. Panning left moves the view left: the scene shifts right."""

MO_PROPERTIES = {
    "back_and_forth": "Which object moves back and forth?",
    "changes": "Which object changes what it is doing partway through the video?",
    "still": "Which object never moves?",
}
"""Motion-related Objects stems, by the property that picks out one object."""

_STEP = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}
"""(row, column) unit displacement per direction."""

_GROWTH = {"grow": 1.6, "shrink": 0.6}
"""Scale factor reached at the end of a grow / shrink."""

LETTERS = "ABCD"


@dataclass(frozen=True)
class SynthQuestion:
    """One four-option question with enough structure to be re-answered from truth."""

    uid: str
    """Unique over the dataset: ``f"{clip_id}-{k}"``."""
    category: str
    """One of :data:`MOTION_CATEGORIES` or :data:`STATIC_CATEGORY`."""
    kind: str
    """What is asked: motion, direction, order, reversals, which_object, camera,
    color, shape or count (see :func:`answer_from_truth`)."""
    stem: str
    options: tuple[str, ...]
    """Four option texts, without letters."""
    answer: str
    """"A".."D"."""
    subject: int | None = None
    """Index into ``truth["objects"]`` of the object asked about, if any."""
    trait: str | None = None
    """For which_object questions: a key of :data:`MO_PROPERTIES`."""

    @property
    def text(self) -> str:
        """MotionBench's question field: the stem, then one ``"A. option"`` line each."""
        lines = [f"{letter}. {option}" for letter, option in zip(LETTERS, self.options, strict=True)]
        return "\n".join([self.stem, *lines])


@dataclass(frozen=True)
class SynthClip:
    """One clip: frames, captions, ground truth and questions."""

    clip_id: str
    """``f"synth-{seed}-{index:05d}"``."""
    video: np.ndarray
    """uint8 ``(F, H, W, 3)`` RGB frames (the same layout as :class:`ToyClip`)."""
    caption: str
    """Scene and motion."""
    static_caption: str
    """Scene and objects only: no motion or camera words."""
    truth: dict[str, Any]
    """Ground-truth attributes, JSON-serialisable (see :func:`generate`)."""
    questions: tuple[SynthQuestion, ...]


@dataclass(frozen=True)
class SynthRecord:
    """A clip as written by :func:`write_dataset`, read back without decoding its video."""

    clip_id: str
    video_path: Path
    caption: str
    static_caption: str
    truth: dict[str, Any]
    questions: tuple[SynthQuestion, ...]


def _check_int(field: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidInput(f"{field}: expected an integer >= {minimum}, got {value!r}")


def generate(n: int, *, seed: int = 0, frames: int = 16, size: int = 64) -> list[SynthClip]:
    """``n`` clips of ``frames`` frames of ``size`` x ``size`` pixels.

    ``truth`` holds ``frames``, ``size``, ``background`` {color, texture},
    ``camera`` {direction (None when still), speed px/frame}, and ``objects``:
    one dict per sprite with role (actor, repeater, steady, extra), color,
    shape, radius, angle (degrees), origin (world [row, col] at frame 0),
    motion, motion parameters and ``track``, the sprite's centre on screen per
    frame as [row, col]. The actor's ``program`` lists its
    segments {action, start, end (frames), direction / speed / rate / factor}.
    """
    _check_int("n", n, 0)
    _check_int("seed", seed, 0)
    _check_int("frames", frames, 8)
    _check_int("size", size, 32)
    if size % 2:
        raise InvalidInput(f"size: expected an even number (mp4 needs even sides), got {size}")
    return [_make_clip(seed, i, frames, size) for i in range(n)]


# --- scene -------------------------------------------------------------------


def _split(rng: np.random.Generator, total: int, parts: int, minimum: int) -> list[int]:
    """Random lengths >= ``minimum`` summing to ``total``."""
    lengths = [minimum] * parts
    for _ in range(total - minimum * parts):
        lengths[int(rng.integers(parts))] += 1
    return lengths


def _motion_params(
    rng: np.random.Generator,
    motion: str,
    linear: str,
    speed: tuple[float, float],
    rate: tuple[float, float],
    unit: float,
) -> dict[str, Any]:
    """The drawn parameters of one motion: the ``linear`` one (``slide``, ``drift``) a direction
    and a speed (``unit`` x uniform in ``speed``), ``spin`` a signed rate (uniform in ``rate``),
    ``grow``/``shrink`` their factor; other motions none."""
    if motion == linear:
        direction = str(rng.choice(DIRECTIONS))
        return {"direction": direction, "speed": round(float(rng.uniform(*speed)) * unit, 3)}
    if motion == "spin":
        return {"rate": round(float(rng.uniform(*rate) * rng.choice([-1, 1])), 3)}
    if motion in _GROWTH:
        return {"factor": _GROWTH[motion]}
    return {}


def _scene(rng: np.random.Generator, frames: int, size: int) -> dict[str, Any]:
    """Draw every attribute of one clip; rendering and questions read only this."""
    intervals = frames - 1
    unit = size / 64  # speeds and sizes are stated for 64-pixel clips

    background = {
        "color": str(rng.choice(list(BACKGROUNDS))),
        "texture": str(rng.choice(TEXTURES)),
    }
    # Still or one of four pans, each a fifth of the clips.
    pan = int(rng.integers(len(DIRECTIONS) + 1))
    camera = {
        "direction": DIRECTIONS[pan] if pan < len(DIRECTIONS) else None,
        "speed": max(1, size // 64) if pan < len(DIRECTIONS) else 0,
    }

    # Actor: one slide plus one or two other actions, each at most once, so the
    # order is unambiguous.
    n_segments = int(rng.integers(2, 4))
    others = rng.choice([a for a in ACTIONS if a != "slide"], n_segments - 1, replace=False)
    actions = [str(a) for a in rng.permutation(["slide", *others])]
    lengths = _split(rng, intervals, n_segments, 2)
    program, start = [], 0
    for action, length in zip(actions, lengths, strict=True):
        segment: dict[str, Any] = {"action": action, "start": start, "end": start + length}
        segment.update(_motion_params(rng, action, "slide", (1.5, 4.0), (20, 40), unit))
        program.append(segment)
        start += length
    actor = {"role": "actor", "motion": "program", "program": program}

    max_reversals = min(4, intervals // 2 - 1)
    reversals = int(rng.integers(1, max_reversals + 1))
    repeater = {
        "role": "repeater",
        "motion": "back_and_forth",
        "axis": str(rng.choice(["horizontal", "vertical"])),
        "reversals": reversals,
        "travel": round(float(rng.uniform(0.25, 0.45)) * size, 3),
        "start_end": int(rng.choice([-1, 1])),
    }
    objects = [actor, repeater]

    if rng.random() < 0.75:
        motion = str(rng.choice(STEADY_MOTIONS))
        steady: dict[str, Any] = {"role": "steady", "motion": motion}
        steady.update(_motion_params(rng, motion, "drift", (1.0, 3.0), (15, 35), unit))
        objects.append(steady)
    if rng.random() < 0.4:
        objects.append({"role": "extra", "motion": "still"})

    # Colours and shapes distinct within a clip, so "the red square" and "the
    # square" each name one object. Spinning sprites draw from SPINNABLE first.
    colors = rng.choice(list(COLORS), len(objects), replace=False)
    spins = [_spins(o) for o in objects]
    order = sorted(range(len(objects)), key=lambda i: not spins[i])
    shapes: dict[int, str] = {}
    for i in order:
        pool = [s for s in (SPINNABLE if spins[i] else SHAPES) if s not in shapes.values()]
        shapes[i] = str(rng.choice(pool))
    for i, obj in enumerate(objects):
        obj["color"] = str(colors[i])
        obj["shape"] = shapes[i]
        obj["radius"] = round(float(rng.uniform(0.07, 0.11)) * size, 3)
        obj["angle"] = round(float(rng.uniform(0, 360)), 3)
        obj["origin"] = [round(float(v), 3) for v in rng.uniform(0, size, 2)]
    return {
        "frames": frames,
        "size": size,
        "background": background,
        "camera": camera,
        "objects": objects,
        "caption_order": [int(i) for i in rng.permutation(len(objects))],
    }


def _spins(obj: dict[str, Any]) -> bool:
    if obj["motion"] == "program":
        return any(s["action"] == "spin" for s in obj["program"])
    return obj["motion"] == "spin"


def _states(obj: dict[str, Any], frames: int) -> list[tuple[float, float, float, float]]:
    """(row, col, angle, scale) in world coordinates at every frame."""
    row, col = obj["origin"]
    angle, scale = obj["angle"], 1.0
    if obj["motion"] == "back_and_forth":
        # A triangle wave starting at one end: legs of equal length, so the
        # turnarounds fall at t = leg, 2 leg, ... and there are exactly
        # `reversals` of them before the last frame.
        legs = obj["reversals"] + 1
        leg = (frames - 1) / legs
        d_row, d_col = (0.0, 1.0) if obj["axis"] == "horizontal" else (1.0, 0.0)
        states = []
        for t in range(frames):
            phase = (t / leg) % 2
            tri = phase if phase <= 1 else 2 - phase
            offset = obj["start_end"] * obj["travel"] * (0.5 - tri)
            states.append((row + d_row * offset, col + d_col * offset, angle, 1.0))
        return states

    states = [(row, col, angle, scale)]
    for t in range(1, frames):
        if obj["motion"] == "program":
            step = next(s for s in obj["program"] if s["start"] < t <= s["end"])
            span = step["end"] - step["start"]
        else:
            step, span = obj, frames - 1
        kind = step.get("action", obj["motion"])
        if kind in ("slide", "drift"):
            d_row, d_col = _STEP[step["direction"]]
            row, col = row + d_row * step["speed"], col + d_col * step["speed"]
        elif kind == "spin":
            angle += step["rate"]
        elif kind in _GROWTH:
            # Linear in time from the scale at the segment start to factor x it.
            t0 = step["start"] if obj["motion"] == "program" else 0
            base = states[t0][3]
            scale = base * (1 + (step["factor"] - 1) * (t - t0) / span)
        states.append((row, col, angle, scale))
    return states


# --- rendering ---------------------------------------------------------------


def _texture(background: dict[str, str], size: int) -> np.ndarray:
    """The world's background, periodic on the torus so it wraps without a seam."""
    base = BACKGROUNDS[background["color"]]
    other = base - 40 if base > 128 else base + 40
    rows, cols = np.indices((size, size))
    cell = size // 8
    kind = background["texture"]
    if kind == "checkered":
        mask = (rows // cell + cols // cell) % 2 == 1
    elif kind == "striped":
        # Diagonal, so a pan in any of the four directions shifts the pattern.
        mask = ((rows + cols) // (size // 16)) % 2 == 1
    elif kind == "dotted":
        mask = (rows % cell < 2) & (cols % cell < 2)
    else:
        mask = np.zeros((size, size), dtype=bool)
    shade = np.where(mask, other, base).astype(np.uint8)
    return np.repeat(shade[:, :, None], 3, axis=2)


def _shape_mask(
    shape: str, d_row: np.ndarray, d_col: np.ndarray, radius: float, angle: float
) -> np.ndarray:
    """Pixels inside ``shape`` given their offsets from its centre, rotated by ``angle`` degrees."""
    theta = math.radians(angle)
    x = math.cos(theta) * d_col - math.sin(theta) * d_row
    y = -math.sin(theta) * d_col - math.cos(theta) * d_row  # y points up
    r = radius
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "ring":
        dist2 = x * x + y * y
        return (dist2 <= r * r) & (dist2 >= (0.55 * r) ** 2)
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.8 * r
    if shape == "bar":
        return (np.abs(x) <= r) & (np.abs(y) <= 0.4 * r)
    if shape == "cross":
        arm = r / 3
        return ((np.abs(x) <= arm) & (np.abs(y) <= r)) | ((np.abs(y) <= arm) & (np.abs(x) <= r))
    if shape == "triangle":
        # Equilateral, apex up: inside all three edges at distance r/2 from the centre.
        inside = np.ones_like(x, dtype=bool)
        for normal in (-90.0, 30.0, 150.0):
            phi = math.radians(normal)
            inside &= x * math.cos(phi) + y * math.sin(phi) <= r / 2
        return inside
    raise AssertionError(f"unknown shape {shape!r}")


def _render(scene: dict[str, Any]) -> tuple[np.ndarray, list[list[list[float]]]]:
    """Frames and each object's on-screen track."""
    frames, size = scene["frames"], scene["size"]
    world = _texture(scene["background"], size)
    camera = scene["camera"]
    cam_step = _STEP[camera["direction"]] if camera["direction"] else (0.0, 0.0)
    states = [_states(obj, frames) for obj in scene["objects"]]
    rows, cols = np.indices((size, size), dtype=np.float64)
    half = size / 2
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    tracks: list[list[list[float]]] = [[] for _ in scene["objects"]]
    # Extra and steady objects first, the actor last: the actor is never hidden.
    draw_order = list(reversed(range(len(scene["objects"]))))
    for t in range(frames):
        cam_row = int(cam_step[0] * camera["speed"] * t)
        cam_col = int(cam_step[1] * camera["speed"] * t)
        # Screen pixel (r, c) shows world pixel (r + cam_row, c + cam_col).
        frame = np.roll(world, (-cam_row, -cam_col), axis=(0, 1))
        for i in draw_order:
            obj = scene["objects"][i]
            row, col, angle, scale = states[i][t]
            row, col = (row - cam_row) % size, (col - cam_col) % size
            tracks[i].append([round(row, 3), round(col, 3)])
            d_row = (rows - row + half) % size - half
            d_col = (cols - col + half) % size - half
            mask = _shape_mask(obj["shape"], d_row, d_col, obj["radius"] * scale, angle)
            frame[mask] = COLORS[obj["color"]]
        video[t] = frame
    return video, tracks


# --- language ----------------------------------------------------------------


def describe(obj: dict[str, Any]) -> str:
    """``"the red square"``: colours and shapes are unique within a clip."""
    return f"the {obj['color']} {obj['shape']}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _static_caption(scene: dict[str, Any]) -> str:
    objs = [scene["objects"][i] for i in scene["caption_order"]]
    names = [f"{_article(o['color'])} {o['color']} {o['shape']}" for o in objs]
    bg = scene["background"]
    return f"{_join(names)} on {_article(bg['texture'])} {bg['texture']} {bg['color']} background"


def _order_text(program: list[dict[str, Any]]) -> str:
    return ", then ".join(ACTION_TEXT[s["action"]] for s in program)


def _motion_sentence(obj: dict[str, Any]) -> str:
    name = describe(obj).capitalize()
    if obj["motion"] == "program":
        steps = [
            f"slides {s['direction']}" if s["action"] == "slide" else ACTION_TEXT[s["action"]]
            for s in obj["program"]
        ]
        return f"{name} first {', then '.join(steps)}."
    if obj["motion"] == "back_and_forth":
        times = "once" if obj["reversals"] == 1 else f"{obj['reversals']} times"
        return f"{name} moves back and forth {obj['axis']}ly, reversing direction {times}."
    if obj["motion"] == "drift":
        return f"{name} moves steadily {obj['direction']}."
    return f"{name} {MOTION_TEXT[obj['motion']]}."


def _caption(scene: dict[str, Any], static_caption: str) -> str:
    sentences = [static_caption[0].upper() + static_caption[1:] + "."]
    sentences += [_motion_sentence(scene["objects"][i]) for i in scene["caption_order"]]
    direction = scene["camera"]["direction"]
    sentences.append(f"The camera pans {direction}." if direction else "The camera stays still.")
    return " ".join(sentences)


# --- questions -----------------------------------------------------------------


def _property_holders(objects: list[dict[str, Any]], prop: str) -> list[int]:
    """Objects with a Motion-related Objects property."""
    if prop == "back_and_forth":
        return [i for i, o in enumerate(objects) if o["motion"] == "back_and_forth"]
    if prop == "changes":
        return [i for i, o in enumerate(objects) if o["motion"] == "program"]
    if prop == "still":
        return [i for i, o in enumerate(objects) if o["motion"] == "still"]
    raise InvalidInput(f"property: expected one of {sorted(MO_PROPERTIES)}, got {prop!r}")


def _expected(truth: dict[str, Any], q: SynthQuestion) -> str:
    """The option text that is right according to ``truth``."""
    objects = truth["objects"]
    obj = objects[q.subject] if q.subject is not None else None
    if q.kind == "motion":
        return MOTION_TEXT[obj["motion"]]
    if q.kind == "direction":
        (slide,) = [s for s in obj["program"] if s["action"] == "slide"]
        return slide["direction"]
    if q.kind == "order":
        return _order_text(obj["program"])
    if q.kind == "reversals":
        return str(obj["reversals"])
    if q.kind == "which_object":
        holders = _property_holders(objects, q.trait)
        if len(holders) != 1:
            raise InvalidInput(f"{q.uid}: {len(holders)} objects have property {q.trait!r}")
        return describe(objects[holders[0]])
    if q.kind == "camera":
        return CAMERA_TEXT[truth["camera"]["direction"]]
    if q.kind == "color":
        return obj["color"]
    if q.kind == "shape":
        return obj["shape"]
    if q.kind == "count":
        return str(len(objects))
    raise InvalidInput(f"{q.uid}: unknown question kind {q.kind!r}")


def answer_from_truth(clip: SynthClip | SynthRecord, question: SynthQuestion) -> str:
    """The letter that ground truth supports, recomputed from ``clip.truth``.

    InvalidInput unless exactly one option is right: a question whose
    distractor is also true, or whose answer is missing, is a generator bug.
    """
    expected = _expected(clip.truth, question)
    letters = [LETTERS[i] for i, text in enumerate(question.options) if text == expected]
    if len(letters) != 1:
        raise InvalidInput(
            f"{question.uid}: {len(letters)} options match the ground truth {expected!r}"
        )
    return letters[0]


def _mcq(rng: np.random.Generator, correct: str, pool: list[str]) -> tuple[tuple[str, ...], str]:
    """Four options: ``correct`` at a uniformly drawn letter, three others drawn from ``pool``."""
    others = [p for p in dict.fromkeys(pool) if p != correct]
    picked = [others[i] for i in rng.choice(len(others), 3, replace=False)]
    slot = int(rng.integers(4))
    picked.insert(slot, correct)
    return tuple(picked), LETTERS[slot]


def _order_distractors(rng: np.random.Generator, used: list[str]) -> list[str]:
    """Three wrong Action Order options whose set does not give the answer away.

    Three actions: three other orderings of the same actions, so only the
    order tells them apart. Two actions (slide and O): the reverse order, and
    slide paired both ways with an action X the actor never does. {SO, OS,
    SX, XS} is the same set whichever of SO and OS is right, and O and X play
    symmetric parts, so the options alone leave the answer at 1 in 4.
    """
    if len(used) == 3:
        perms = [list(p) for p in itertools.permutations(used) if list(p) != used]
        wrong = [perms[i] for i in rng.choice(len(perms), 3, replace=False)]
    else:
        unused = [a for a in ACTIONS if a not in used]
        x = str(rng.choice(unused))
        wrong = [used[::-1], ["slide", x], [x, "slide"]]
    return [", then ".join(ACTION_TEXT[a] for a in seq) for seq in wrong]


def _questions(rng: np.random.Generator, clip_id: str, scene: dict[str, Any]) -> list[SynthQuestion]:
    """Nine questions: one per MotionBench category, then colour, shape and count.

    Each spec names what is asked and a pool of wrong options; the right one
    comes from :func:`_expected`, the function :func:`answer_from_truth` uses,
    and the test that re-answers every question checks the pools hold no
    second right option.
    """
    objects = scene["objects"]
    actor, repeater = objects[0], objects[1]
    truth = {"objects": objects, "camera": scene["camera"]}
    specs: list[tuple[str, str, str, list[str], int | None, str | None]] = []

    # The steady object when there is one, so that the six motions are about
    # equally often right and no option is a good guess from the text alone.
    roles = {o["role"]: i for i, o in enumerate(objects)}
    if "steady" in roles:
        target = roles["steady"]
    elif "extra" in roles:
        target = int(rng.choice([roles["repeater"], roles["extra"]]))
    else:
        target = roles["repeater"]
    specs.append((
        "Motion Recognition", "motion", f"What does {describe(objects[target])} do during the video?",
        list(MOTION_TEXT.values()), target, None,
    ))
    specs.append((
        "Location-related Motion", "direction",
        f"In which direction does {describe(actor)} slide across the scene?",
        list(DIRECTIONS), 0, None,
    ))
    specs.append((
        "Action Order", "order", f"In what order does {describe(actor)} do things?",
        _order_distractors(rng, [s["action"] for s in actor["program"]]), 0, None,
    ))
    specs.append((
        "Repetition Count", "reversals", f"How many times does {describe(repeater)} reverse direction?",
        [str(k) for k in range(1, 5)], 1, None,
    ))
    prop = str(rng.choice([p for p in MO_PROPERTIES if len(_property_holders(objects, p)) == 1]))
    (holder,) = _property_holders(objects, prop)
    # Other visible objects first (a frame shows they exist, not how they
    # move), then objects absent from the clip to fill three wrong options.
    wrong = [describe(o) for i, o in enumerate(objects) if i != holder][:3]
    absent = [
        f"the {c} {s}" for c in COLORS for s in SHAPES
        if not any(o["color"] == c or o["shape"] == s for o in objects)
    ]
    wrong += [absent[i] for i in rng.choice(len(absent), 3 - len(wrong), replace=False)]
    specs.append(("Motion-related Objects", "which_object", MO_PROPERTIES[prop], wrong, None, prop))
    specs.append((
        "Camera Motion", "camera", "How does the camera move?", list(CAMERA_TEXT.values()), None, None,
    ))
    subject = int(rng.integers(len(objects)))
    specs.append((
        STATIC_CATEGORY, "color", f"What colour is the {objects[subject]['shape']}?",
        list(COLORS), subject, None,
    ))
    subject = int(rng.integers(len(objects)))
    specs.append((
        STATIC_CATEGORY, "shape", f"What shape is the {objects[subject]['color']} object?",
        list(SHAPES), subject, None,
    ))
    specs.append((
        STATIC_CATEGORY, "count", "How many objects are in the video?",
        [str(k) for k in range(1, 6)], None, None,
    ))

    questions = []
    for k, (category, kind, stem, pool, subject, prop) in enumerate(specs):
        uid = f"{clip_id}-{k}"
        correct = _expected(truth, SynthQuestion(uid, category, kind, stem, (), "", subject, prop))
        options, letter = _mcq(rng, correct, pool)
        questions.append(SynthQuestion(uid, category, kind, stem, options, letter, subject, prop))
    return questions


def _make_clip(seed: int, index: int, frames: int, size: int) -> SynthClip:
    clip_id = f"synth-{seed}-{index:05d}"
    scene = _scene(np.random.default_rng([seed, index, 0]), frames, size)
    video, tracks = _render(scene)
    for obj, track in zip(scene["objects"], tracks, strict=True):
        obj["track"] = track
    static_caption = _static_caption(scene)
    questions = _questions(np.random.default_rng([seed, index, 1]), clip_id, scene)
    truth = {k: v for k, v in scene.items() if k != "caption_order"}
    return SynthClip(
        clip_id=clip_id,
        video=video,
        caption=_caption(scene, static_caption),
        static_caption=static_caption,
        truth=truth,
        questions=tuple(questions),
    )


# --- files -----------------------------------------------------------------------

META_FILE = "video_info.meta.jsonl"
SIDECAR_FILE = "synthmotion.jsonl"


def write_dataset(clips: list[SynthClip], out_dir: str | Path, *, fps: int = 8) -> Path:
    """Write ``videos/{clip_id}.mp4``, ``video_info.meta.jsonl`` and ``synthmotion.jsonl``.

    Returns the meta file's path. Video paths in both files are relative to
    ``out_dir``. Files are written under a temporary name and renamed, so an
    interrupted write never leaves a meta file that lists missing videos.
    """
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    meta_lines, sidecar_lines = [], []
    for clip in clips:
        rel = f"videos/{clip.clip_id}.mp4"
        tmp = out / f"{rel}.tmp.mp4"
        write_mp4(clip.video, tmp, fps=fps)
        tmp.replace(out / rel)
        frames, height, width, _ = clip.video.shape
        duration = frames / fps
        for category in (*MOTION_CATEGORIES, STATIC_CATEGORY):
            qa = [
                {"uid": q.uid, "question": q.text, "answer": q.answer, "start": 0.0, "end": duration}
                for q in clip.questions
                if q.category == category
            ]
            meta_lines.append({
                "key": f"{clip.clip_id}-{CATEGORY_CODES[category]}",
                "video_path": rel,
                "video_type": "synthmotion",
                "question_type": category,
                "video_info": {"duration": duration, "fps": fps, "resolution": f"{width}x{height}"},
                "qa": qa,
            })
        sidecar_lines.append({
            "id": clip.clip_id,
            "video_path": rel,
            "caption": clip.caption,
            "static_caption": clip.static_caption,
            "truth": clip.truth,
            "questions": [asdict(q) for q in clip.questions],
        })
    for name, lines in ((SIDECAR_FILE, sidecar_lines), (META_FILE, meta_lines)):
        tmp = out / f"{name}.tmp"
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        tmp.replace(out / name)
    return out / META_FILE


def read_sidecar(out_dir: str | Path) -> list[SynthRecord]:
    """Captions, ground truth and questions of a dataset written by :func:`write_dataset`."""
    path = Path(out_dir) / SIDECAR_FILE
    if not path.is_file():
        raise NotFound(f"out_dir: {str(path)!r} does not exist; write it with write_dataset")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                raw = json.loads(line)
                questions = tuple(
                    SynthQuestion(**{**q, "options": tuple(q["options"])}) for q in raw["questions"]
                )
                records.append(SynthRecord(
                    clip_id=raw["id"],
                    video_path=path.parent / raw["video_path"],
                    caption=raw["caption"],
                    static_caption=raw["static_caption"],
                    truth=raw["truth"],
                    questions=questions,
                ))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise InvalidInput(f"{path}:{number}: not a SynthMotion record ({err!r})") from None
    return records
