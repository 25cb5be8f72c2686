"""Linear probes: what do a student's video features carry about SynthMotion's ground truth?

VDA can only teach motion through what the encoder's features F_V carry, and
the VideoLLM can only answer from what its video tokens carry. Accuracy on the
benchmark mixes that with the LLM's skill; a probe asks the features directly.
``vidalign probe`` runs it on any student, checkpoint or stage-2 encoder.

**Targets**, for every object of every clip (two to four sprites; the on-screen
centre per frame is ``truth["objects"][i]["track"]``, camera pans included):

- *position*: for each temporal step of the features, the cell of a
  ``grid x grid`` partition of the frame holding the object's centre, cells
  numbered row-major (``grid**2`` classes). A step is labelled with the clip
  frame of its first sampled frame (:func:`step_frames`: the student samples
  ``uniform_indices(clip_frames, num_frames)``; Qwen2.5-VL's temporal patches
  make one step of two frames).
- *direction*: for each pair of consecutive steps, the object's on-screen
  displacement between their clip frames, classified into
  :data:`DIRECTION_CLASSES`: ``still`` when it moved less than
  :data:`STILL_SPEED` pixels per frame (at 64 px; scaled with the frame size),
  else the dominant axis and its sign (``up`` is towards row 0; a tie counts
  as horizontal). The input is the two steps' features concatenated, so a
  linear probe can read the difference of positions. Pairs in which the
  object leaves one edge and comes back at the other (SynthMotion's world is
  a torus) are left out: there the direction is not a function of the two
  positions, and even exact coordinates fall to chance when they stay in
  (measured: 86% without them, 21% with them). A displacement of more than
  half the frame is taken for such a crossing, so sampled frames must be
  closer than that (SynthMotion at 16 frames, 8 sampled: at most 15 px).

**Identity.** "Where is the object" needs "which object": a clip's sprites
have random colours, so a probe that is not told which one is asked about
cannot do better than guess among them (the actor alone from 16 x 16 raw
pixels: 14%, against 54% told its colour). The object's colour, unique within
a clip, is its identity, and the probe is linear in ``features x one-hot(colour)``:
its ridge problem splits into one block per colour, so it is fitted as one
ridge per colour, with one shared lambda.

**Probe**: ridge regression from standardised features to one-hot targets,
closed form (``torch.linalg.solve``, float64; the primal or the dual system,
whichever is smaller), predicting the arg-max. Rows are split **by clip**, never
by frame: the probe fits on the training clips, with lambda chosen from
:data:`LAMBDAS` by accuracy on a held-out quarter of them
(:data:`VALIDATION_FRACTION`, drawn with the seed), refits on all training
clips, and is scored on clips it never saw. Everything is deterministic for a
seed.

**Chance**, reported beside every accuracy: ``uniform`` (1 / classes) and
``majority`` (held-out accuracy of answering each object's identity's most
frequent class in training: what the identity alone gives). **Noise control**: Gaussian features of the same shape with
each dimension's mean and standard deviation, probed the same way; it must
come out at chance, else the probe (or the split) leaks the answer.

**Feature sources**:

- ``F_V frame`` and ``F_V grid:G`` -- F_V as the VDA teacher sees it:
  ``encoder(encoder.preprocess(video))`` with ``"frame"`` pooling (one token
  per frame) or ``"grid:G"`` pooling (G x G tokens per frame, flattened per
  frame, so the probe sees the layout);
- ``LLM tokens grid:G`` -- the projected video tokens the LLM reads, captured
  where the VideoLLM hands its ``inputs_embeds`` to the language model; each
  frame's grid cells (the family's :class:`~vidalign.students.VisionGrid`,
  without CLS) average-pooled to G x G and flattened.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vidalign.errors import InvalidInput, NotFound
from vidalign.log import get_logger
from vidalign.video import uniform_indices

if TYPE_CHECKING:
    from vidalign.data.synth import SynthClip
    from vidalign.students.encoder import VideoEncoder
    from vidalign.students.family import VisionGrid
    from vidalign.students.videollm import VideoLLM

log = get_logger(__name__)

DIRECTION_CLASSES = ("still", "left", "right", "up", "down")
"""Classes of the direction target, in label order."""

STILL_SPEED = 0.5
"""Pixels per frame (at 64 px) below which a displacement counts as ``still``. SynthMotion's
slowest slide is 1.5 and a camera pan 1 px per frame, so any of them between two sampled
frames is motion, and a pause, spin or size change without a pan is still."""

LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
"""Ridge strengths tried, per training row: the probe minimises
``mean ||z W - y||^2 + lambda ||W||^2`` on standardised features z."""

VALIDATION_FRACTION = 0.25
"""Share of the training clips that choose lambda (then the probe refits on all of them)."""

TARGETS = ("position", "direction")

FEATURES = ("fv", "llm", "both")
"""``vidalign probe --features`` choices."""

_PROMPT = "What happens in the video?"
"""The prompt beside the video when capturing the LLM's video tokens (they do not depend on it)."""


# --- targets ---------------------------------------------------------------------------------


def step_frames(clip_frames: int, num_frames: int, frames_per_step: int = 1) -> list[int]:
    """The clip frame that labels each temporal step of a student's features.

    The student samples ``uniform_indices(clip_frames, num_frames)``; step ``s``
    covers sampled frames ``s * frames_per_step`` onwards and is labelled with the
    first of them.
    """
    if frames_per_step < 1:
        raise InvalidInput(f"frames_per_step: expected an integer >= 1, got {frames_per_step}")
    return uniform_indices(clip_frames, num_frames)[::frames_per_step]


def cell_index(row: float, col: float, *, size: int, grid: int) -> int:
    """Row-major index of the ``grid x grid`` cell holding pixel position ``(row, col)``."""
    r = min(int(row * grid / size), grid - 1)
    c = min(int(col * grid / size), grid - 1)
    return r * grid + c


def direction_class(d_row: float, d_col: float, *, frames_apart: int, size: int) -> int:
    """Index into :data:`DIRECTION_CLASSES` of a displacement over ``frames_apart`` frames."""
    still = STILL_SPEED * size / 64 * max(frames_apart, 1)
    if max(abs(d_row), abs(d_col)) < still:
        return DIRECTION_CLASSES.index("still")
    if abs(d_col) >= abs(d_row):
        return DIRECTION_CLASSES.index("right" if d_col > 0 else "left")
    return DIRECTION_CLASSES.index("down" if d_row > 0 else "up")


def position_labels(
    track: Sequence[Sequence[float]], frames: Sequence[int], *, size: int, grid: int
) -> list[int]:
    """The cell of an object's ``track`` (on-screen ``[row, col]`` per clip frame) at ``frames``."""
    return [cell_index(*track[f], size=size, grid=grid) for f in frames]


def direction_labels(
    track: Sequence[Sequence[float]], frames: Sequence[int], *, size: int
) -> list[int | None]:
    """The direction of an object's ``track`` between each pair of consecutive ``frames``
    (:func:`direction_class`), or ``None`` where it crosses the frame's edge: a displacement
    of more than half the frame is the torus wrapping round (module docstring)."""
    labels: list[int | None] = []
    for a, b in itertools.pairwise(frames):
        d_row, d_col = track[b][0] - track[a][0], track[b][1] - track[a][1]
        crossed = max(abs(d_row), abs(d_col)) > size / 2
        labels.append(
            None if crossed else direction_class(d_row, d_col, frames_apart=b - a, size=size)
        )
    return labels


# --- the probe -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearProbe:
    """A fitted ridge probe: ``argmax(((x - mean) / scale) @ weight + bias)``."""

    mean: Tensor
    scale: Tensor
    weight: Tensor
    bias: Tensor
    lam: float

    def predict(self, x: Tensor) -> Tensor:
        """Class indices of the rows of ``x`` ``(N, D)``."""
        z = (x.to(self.mean) - self.mean) / self.scale
        return (z @ self.weight + self.bias).argmax(dim=1)


def fit_ridge(
    x: Tensor, labels: Tensor, num_classes: int, lambdas: Sequence[float] = LAMBDAS
) -> list[LinearProbe]:
    """One ridge probe per lambda, from ``x`` ``(N, D)`` to one-hot ``labels`` ``(N,)``.

    Features are standardised with the rows' own mean and std (a constant
    dimension is left at zero), targets centred (the bias is their mean). The
    Gram matrix is formed once and solved for every lambda, in the primal
    (D x D) or the dual (N x N) form, whichever is smaller; both give
    ``W = (z^T z + lambda N I)^-1 z^T y``.
    """
    if x.ndim != 2 or labels.shape != (x.shape[0],) or x.shape[0] == 0:
        raise InvalidInput(
            f"x, labels: expected shapes (N, D) and (N,) with N >= 1, got {tuple(x.shape)} "
            f"and {tuple(labels.shape)}"
        )
    x = x.double()
    n, d = x.shape
    mean = x.mean(dim=0)
    scale = x.std(dim=0, unbiased=False)
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
    z = (x - mean) / scale
    y = F.one_hot(labels.long(), num_classes).double()
    bias = y.mean(dim=0)
    y = y - bias
    primal = d <= n
    gram = z.T @ z if primal else z @ z.T
    rhs = z.T @ y if primal else y
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    probes = []
    for lam in lambdas:
        solution = torch.linalg.solve(gram + lam * n * eye, rhs)
        weight = solution if primal else z.T @ solution
        probes.append(LinearProbe(mean, scale, weight, bias, float(lam)))
    return probes


def split_by_clip(groups: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Boolean row masks ``(kept, held)``: ``fraction`` of the distinct ``groups`` (clips),
    at least one and never all of them, drawn with ``seed``, go to ``held``, with every
    row of theirs. So no clip has rows on both sides."""
    clips = torch.unique(groups)
    if len(clips) < 2:
        raise InvalidInput(f"groups: need at least 2 clips to split, got {len(clips)}")
    order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(seed))
    count = min(max(1, round(fraction * len(clips))), len(clips) - 1)
    held = torch.isin(groups, clips[order[:count]])
    return ~held, held


def _accuracy(predicted: Tensor, labels: Tensor) -> float:
    return float((predicted == labels).double().mean())


@dataclass(frozen=True)
class ProbeRows:
    """The rows of one target: inputs, labels, and which clip and object each row is about."""

    x: Tensor
    """``(R, D)`` features."""
    labels: Tensor
    """``(R,)`` class indices."""
    groups: Tensor
    """``(R,)`` the row's clip: splits never separate a clip's rows."""
    identity: Tensor
    """``(R,)`` the object's identity (its colour's index in ``vidalign.data.synth.COLORS``):
    one probe each."""
    classes: int


@dataclass(frozen=True)
class ProbeScore:
    """A probe's held-out accuracy and the chance levels beside it."""

    accuracy: float
    stderr: float
    """Standard error of ``accuracy`` with rows clustered by clip (a clip's rows share their
    frames, camera and objects, so they are not independent draws)."""
    chosen_lambda: float
    """The ridge lambda chosen on the validation clips."""
    majority: float
    """Held-out accuracy of answering, for each object, the most frequent class of the training
    rows of its identity: what the probe gets from the identity alone, no features."""
    uniform: float
    """1 / classes."""
    classes: int
    train_rows: int
    """Rows the final probe was fitted on (all training clips)."""
    test_rows: int
    """Rows it was scored on (the held-out clips)."""


def _predict_by_identity(
    rows: ProbeRows, fit: Tensor, scored: Tensor, lambdas: Sequence[float]
) -> Tensor:
    """``(len(lambdas), scored rows)`` predictions of one ridge per identity, fitted on the
    ``fit`` rows. An identity without fitting rows gets the fitting rows' majority class."""
    y_fit = rows.labels[fit]
    fallback = int(torch.bincount(y_fit, minlength=rows.classes).argmax())
    predictions = torch.full((len(lambdas), int(scored.sum())), fallback, dtype=torch.long)
    x_scored, scored_ids = rows.x[scored], rows.identity[scored]
    for ident in torch.unique(scored_ids):
        mine = fit & (rows.identity == ident)
        if not mine.any():
            continue
        targets = scored_ids == ident
        probes = fit_ridge(rows.x[mine], rows.labels[mine], rows.classes, lambdas)
        for k, probe in enumerate(probes):
            predictions[k, targets] = probe.predict(x_scored[targets])
    return predictions


def _majority_by_identity(rows: ProbeRows, fit: Tensor) -> Tensor:
    """For each identity, the most frequent class of its ``fit`` rows (the fitting rows'
    most frequent class for an identity without any): what the identity alone predicts."""
    identities = int(rows.identity.max()) + 1
    counts = torch.zeros(identities, rows.classes, dtype=torch.long)
    counts.index_put_(
        (rows.identity[fit], rows.labels[fit]), torch.ones_like(rows.labels[fit]), accumulate=True
    )
    table = counts.argmax(dim=1)
    table[counts.sum(dim=1) == 0] = int(counts.sum(dim=0).argmax())
    return table


def probe_accuracy(
    rows: ProbeRows, test: Tensor, *, seed: int = 0, lambdas: Sequence[float] = LAMBDAS
) -> ProbeScore:
    """Fit on the rows outside the boolean mask ``test`` and score on those inside it.

    Lambda is chosen on a by-clip split of the training rows
    (:func:`split_by_clip`, seeded), by the accuracy of all identities' probes
    together; ``test`` must not share a clip with the training rows.
    """
    train = ~test
    if not train.any() or not test.any():
        raise InvalidInput("test: expected both training and held-out rows")
    if torch.isin(rows.groups[test], rows.groups[train]).any():
        raise InvalidInput("test: a clip has rows on both sides of the split")
    lambdas = sorted(lambdas)
    fit = train.clone()
    fit[train], _ = split_by_clip(rows.groups[train], VALIDATION_FRACTION, seed)
    val = train & ~fit
    val_labels = rows.labels[val]
    best, best_acc = lambdas[0], -1.0
    for lam, predicted in zip(lambdas, _predict_by_identity(rows, fit, val, lambdas), strict=True):
        acc = _accuracy(predicted, val_labels)
        if acc >= best_acc:  # ties go to the stronger ridge
            best, best_acc = lam, acc
    (predicted,) = _predict_by_identity(rows, train, test, [best])
    test_labels = rows.labels[test]
    majority = _majority_by_identity(rows, train)[rows.identity[test]]
    return ProbeScore(
        accuracy=_accuracy(predicted, test_labels),
        stderr=clustered_stderr(predicted == test_labels, rows.groups[test]),
        chosen_lambda=best,
        majority=_accuracy(majority, test_labels),
        uniform=1.0 / rows.classes,
        classes=rows.classes,
        train_rows=int(train.sum()),
        test_rows=int(test.sum()),
    )


def clustered_stderr(hits: Tensor, groups: Tensor) -> float:
    """Standard error of the hit rate ``hits.mean()`` when rows come in clusters (``groups``).

    The ratio estimator's: with ``h_c`` hits and ``m_c`` rows in cluster c and
    ``a = sum h / sum m``, ``se = sqrt(C / (C - 1) * sum (h_c - a m_c)^2) / sum m``
    over the C clusters; 0 with one cluster.
    """
    _, cluster = torch.unique(groups, return_inverse=True)
    clusters = int(cluster.max()) + 1 if len(cluster) else 0
    if clusters < 2:
        return 0.0
    h = torch.zeros(clusters, dtype=torch.float64).index_add_(0, cluster, hits.double())
    m = torch.bincount(cluster, minlength=clusters).double()
    a = h.sum() / m.sum()
    return float(torch.sqrt(clusters / (clusters - 1) * ((h - a * m) ** 2).sum()) / m.sum())


def noise_like(features: Tensor, seed: int) -> Tensor:
    """Gaussian features of ``features``' shape, each last-axis dimension with its mean and std."""
    flat = features.reshape(-1, features.shape[-1]).double()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(features.shape, generator=g, dtype=torch.float64)
    return (noise * flat.std(dim=0, unbiased=False) + flat.mean(dim=0)).to(features.dtype)


def target_rows(
    features: Tensor,
    truths: Sequence[dict[str, Any]],
    frames: Sequence[int],
    target: str,
    *,
    grid: int,
) -> ProbeRows:
    """The rows of one target from per-step features ``(N, S, D)`` of clips with ``truths``.

    Position: one row per (clip, object, step), the step's features. Direction:
    one row per (clip, object, consecutive steps), the two steps' features
    concatenated, except where the object crosses the frame's edge. ``frames``
    are the clip frames labelling the steps.
    """
    from vidalign.data.synth import COLORS

    n, steps, _ = features.shape
    if steps != len(frames) or n != len(truths):
        raise InvalidInput(
            f"features: expected ({len(truths)}, {len(frames)}, D) for the clips' steps, "
            f"got {tuple(features.shape)}"
        )
    if target == "position":
        per_step, classes = features, grid * grid
    elif target == "direction":
        per_step = torch.cat([features[:, :-1], features[:, 1:]], dim=-1)
        classes = len(DIRECTION_CLASSES)
    else:
        raise InvalidInput(f"target: expected one of {TARGETS}, got {target!r}")
    colors = list(COLORS)
    index: list[tuple[int, int]] = []  # (clip, step) of each row
    labels: list[int] = []
    identity: list[int] = []
    for i, truth in enumerate(truths):
        for obj in truth["objects"]:
            found = (
                position_labels(obj["track"], frames, size=truth["size"], grid=grid)
                if target == "position"
                else direction_labels(obj["track"], frames, size=truth["size"])
            )
            for step, label in enumerate(found):
                if label is not None:
                    index.append((i, step))
                    labels.append(label)
                    identity.append(colors.index(obj["color"]))
    clip, step = torch.tensor(index).reshape(-1, 2).T
    return ProbeRows(
        x=per_step[clip, step],
        labels=torch.tensor(labels, dtype=torch.long),
        groups=clip,
        identity=torch.tensor(identity, dtype=torch.long),
        classes=classes,
    )


# --- feature sources -------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One kind of features: uint8 videos ``(B, F, H, W, 3)`` -> per-step ``(B, S, D)``."""

    name: str
    extract: Callable[[Tensor], Tensor]
    num_frames: int
    frames_per_step: int = 1


def encoder_features(encoder: VideoEncoder, videos: Tensor) -> Tensor:
    """F_V per temporal step: ``(B, S * k, d_v)`` (frame-major) -> ``(B, S, k * d_v)``."""
    with torch.no_grad():
        device = next(encoder.tower.parameters()).device
        features = encoder(encoder.preprocess(videos.to(device)))
    return features.reshape(features.shape[0], -1, encoder.tokens_per_frame * encoder.d_v).cpu()


class _Captured(Exception):
    """Raised by the capture hook: the language model's work is not needed."""


def _language_model(model: nn.Module) -> nn.Module:
    for name, module in model.named_modules():
        if name == "language_model" or name.endswith(".language_model"):
            return module
    raise InvalidInput(
        f"{type(model).__name__}: no language_model submodule to read the video tokens at"
    )


def _token_grid(llm: VideoLLM, pool: int) -> VisionGrid:
    """The family's grid of ``llm``'s video tokens; InvalidInput unless ``pool`` fits in it."""
    grid = llm.family.vision_grid(llm.encoder, llm.config)
    if not 1 <= pool <= min(grid.height, grid.width):
        raise InvalidInput(
            f"pool: expected 1..{min(grid.height, grid.width)} (the LLM's token grid is "
            f"{grid.height} x {grid.width} per frame), got {pool}"
        )
    return grid


def llm_video_tokens(llm: VideoLLM, videos: Tensor, pool: int) -> Tensor:
    """The projected video tokens the LLM reads, per step pooled to ``pool x pool``: ``(B, S, pool**2 * d)``.

    They are captured at the language model's input (``inputs_embeds``, where
    every family has scattered its video features into the text embeddings),
    then the family's grid cells are taken in (t, y, x) order (CLS left out).
    """
    from vidalign.students.encoder import pool_grid

    grid = _token_grid(llm, pool)
    inputs = llm.build_inputs(videos, [_PROMPT] * videos.shape[0])
    captured: dict[str, Tensor] = {}

    def capture(_module: nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
        if kwargs.get("inputs_embeds") is not None:
            captured["embeds"] = kwargs["inputs_embeds"]
        raise _Captured

    handle = _language_model(llm.model).register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            llm.model(**inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "embeds" not in captured:
        raise InvalidInput(f"{llm.spec.name}: the language model was not given inputs_embeds")
    embeds = captured["embeds"].float().cpu()
    mask = (inputs["input_ids"] == llm.video_token_id).cpu()
    counts = mask.sum(dim=1)
    if (counts != grid.n_tokens).any():
        raise InvalidInput(
            f"{llm.spec.name}: expected {grid.n_tokens} video tokens per video, got {counts.tolist()}"
        )
    b, d = embeds.shape[0], embeds.shape[-1]
    tokens = embeds[mask].view(b, grid.n_tokens, d)[:, list(grid.cells)]
    tokens = tokens.reshape(b * grid.frames, grid.height, grid.width, d)
    return pool_grid(tokens, pool).reshape(b, grid.frames, -1)


# --- what to probe ---------------------------------------------------------------------------


def student_checkpoint(weights: str) -> str:
    """The local VideoLLM checkpoint directory of ``--weights``: the directory (or store
    artifact) itself when it holds ``config.json``, else its ``model`` component (a root
    staged like ``vidalign models pull`` or the demo's ``assets/demo/videollm``)."""
    from vidalign.hub import weights_component
    from vidalign.store import materialize

    try:
        local = materialize(weights)
    except NotFound:
        local = None
    if local is not None and (local / "config.json").is_file():
        return str(local)
    component = weights_component(weights, "model")
    if component is not None and (Path(component) / "config.json").is_file():
        return component
    raise NotFound(
        f"--weights {weights}: no config.json there nor in {weights.rstrip('/')}/model; expected a "
        "VideoLLM checkpoint directory (e.g. assets/demo/videollm/model) or a store URI of one"
    )


def encoder_artifact(location: str) -> tuple[str, dict[str, Any]]:
    """``(artifact, manifest meta)`` of a stage-2 encoder: ``location`` itself (a store URI,
    a directory holding ``encoder.safetensors``, or the file) or, for a stage-2
    ``output.dir``, its ``encoder`` artifact. The meta is ``{}`` without a manifest."""
    from vidalign.store import MANIFEST, Manifest, materialize

    for candidate in (location, f"{location.rstrip('/')}/encoder"):
        try:
            local = materialize(candidate)
        except NotFound:
            continue
        if local.is_file() or (local / "encoder.safetensors").is_file():
            manifest = local / MANIFEST
            meta = (
                Manifest.from_json(manifest.read_bytes(), str(manifest)).meta
                if local.is_dir() and manifest.is_file()
                else {}
            )
            return candidate, meta
    raise NotFound(
        f"--encoder {location}: no encoder.safetensors there nor in {location.rstrip('/')}/encoder; "
        "expected a stage-2 encoder artifact (store URI, directory or file) or a stage-2 output.dir"
    )


def _load_encoder_state(
    encoder: VideoEncoder, state: dict[str, Tensor], where: str, base: str
) -> None:
    """Put a stage-2 state dict into ``encoder``'s tower; a one-line error when it does not fit."""
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        reason = (problems[0] if problems else str(err))[:200]
        raise InvalidInput(
            f"--encoder {where}: its weights do not fit {base}; give --weights the checkpoint "
            f"stage 2 started from ({reason})"
        ) from None


def load_sources(
    student: str,
    *,
    weights: str | None = None,
    encoder: str | None = None,
    features: str = "both",
    pool: int = 4,
    device: str = "cpu",
) -> list[Source]:
    """The feature sources of a student (see the module docstring), loaded with the existing loaders.

    ``weights``: the student's checkpoint (:func:`student_checkpoint`; default: the
    registry's source, random init for a tiny preset). ``encoder``: a stage-2 encoder
    (:func:`encoder_artifact`) put into the student's tower. ``features``: ``fv``
    (the encoder alone: only the tower is read), ``llm`` or ``both`` (the whole VideoLLM).
    """
    from vidalign.students import get_family, get_student_spec, load_student
    from vidalign.students.answerer import load_encoder_artifact
    from vidalign.students.family import tower_view

    if features not in FEATURES:
        raise InvalidInput(f"features: expected one of {FEATURES}, got {features!r}")
    spec = get_student_spec(student)
    path = student_checkpoint(weights) if weights else None
    state, base = None, f"{student} ({path or 'registry weights'})"
    if encoder:
        artifact, meta = encoder_artifact(encoder)
        trained_for = meta.get("student")
        if trained_for and trained_for != student:
            raise InvalidInput(
                f"--encoder {encoder}: trained for student {trained_for!r} (its manifest), not "
                f"{student!r}; give --student {trained_for}"
            )
        state = load_encoder_artifact(artifact)
    poolings = ("frame", f"grid:{pool}")
    llm_sources: list[Source] = []
    if features == "fv":
        views = [load_student(student, pooling=p, path=path, device=device) for p in poolings]
        towers = views
    else:
        from vidalign.students.videollm import load_videollm

        llm = load_videollm(student, path=path, device=device)
        family = get_family(spec)
        # F_V views on the model's own tower (not copies): the stage-2 weights go in once.
        views = [
            tower_view(
                lambda t, p=p: family.make_encoder(spec, t, llm.config, p), llm.encoder.tower
            )
            for p in (poolings if features == "both" else ())
        ]
        towers = [llm.encoder]
        grid = _token_grid(llm, pool)
        llm_sources.append(
            Source(
                f"LLM tokens grid:{pool}",
                lambda v: llm_video_tokens(llm, v, pool),
                grid.num_frames,
                grid.frames_per_step,
            )
        )
    if state is not None:
        for tower in towers:
            _load_encoder_state(tower, state, encoder, base)
    fv_sources = [
        Source(
            f"F_V {view.pooling}",
            lambda v, e=view: encoder_features(e, v),
            view.num_frames,
            view.frames_per_step,
        )
        for view in views
    ]
    return fv_sources + llm_sources


# --- the report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeRow:
    """One line of the report: a target probed on one source and on its noise control."""

    target: str
    source: str
    dims: int
    score: ProbeScore
    noise: ProbeScore


@dataclass
class ProbeReport:
    settings: dict[str, Any]
    rows: list[ProbeRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the settings and one record per row (noise control as ``noise_*``)."""
        results = []
        for row in self.rows:
            results.append(
                {
                    "target": row.target,
                    "source": row.source,
                    "dims": row.dims,
                    **asdict(row.score),
                    "noise_accuracy": row.noise.accuracy,
                    "noise_chosen_lambda": row.noise.chosen_lambda,
                }
            )
        return {**self.settings, "results": results}

    def table(self) -> str:
        """The printed table: target x source -> accuracy (± its clustered standard error),
        the noise control's accuracy, chance (majority, uniform) and the chosen lambda."""
        head = (
            f"{'target':<10} {'source':<20} {'dims':>6} {'accuracy':>14} {'noise':>7} "
            f"{'majority':>9} {'uniform':>8} {'lambda':>7}"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            s = r.score
            accuracy = f"{s.accuracy:.1%} ± {s.stderr:.1%}"
            lines.append(
                f"{r.target:<10} {r.source:<20} {r.dims:>6} {accuracy:>14} "
                f"{r.noise.accuracy:>7.1%} {s.majority:>9.1%} {s.uniform:>8.1%} "
                f"{s.chosen_lambda:>7g}"
            )
        return "\n".join(lines) + "\n"


def _extract(source: Source, clips: Sequence[SynthClip], batch_size: int) -> Tensor:
    """``source`` over all clips, in batches, with a progress event per batch."""
    parts = []
    for start in range(0, len(clips), batch_size):
        batch = clips[start : start + batch_size]
        videos = torch.from_numpy(np.stack([c.video for c in batch]))
        parts.append(source.extract(videos).float())
        log.info("probe_features", source=source.name, clips=start + len(batch), of=len(clips))
    return torch.cat(parts)


def check_probe_args(
    *, train_clips: int, held_out_clips: int, grid: int, pool: int = 1, batch_size: int = 1
) -> None:
    """One-line errors for values the probe cannot run with (checked before any loading)."""
    for name, value, minimum in (
        ("clips (training)", train_clips, 2),  # lambda needs a fitting and a validation clip
        ("clips (held out)", held_out_clips, 1),
        ("grid", grid, 2),
        ("pool", pool, 1),
        ("batch size", batch_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InvalidInput(f"{name}: expected an integer >= {minimum}, got {value!r}")


def run_probe(
    sources: Sequence[Source],
    clips: Sequence[SynthClip],
    *,
    train_clips: int,
    seed: int = 0,
    grid: int = 4,
    batch_size: int = 32,
    settings: dict[str, Any] | None = None,
) -> ProbeReport:
    """Probe every target on every source, and on its noise control.

    ``clips[:train_clips]`` train the probes, the rest score them; all clips must
    have the same number of frames.
    """
    check_probe_args(
        train_clips=train_clips,
        held_out_clips=len(clips) - train_clips,
        grid=grid,
        batch_size=batch_size,
    )
    report = ProbeReport(
        {
            **(settings or {}),
            "grid": grid,
            "objects": "each, identity = colour",
            "direction_classes": list(DIRECTION_CLASSES),
            "lambdas": list(LAMBDAS),
        }
    )
    clip_frames = len(clips[0].video)
    truths = [clip.truth for clip in clips]
    for index, source in enumerate(sources):
        features = _extract(source, clips, batch_size)
        noise = noise_like(features, seed + index)
        labelled = step_frames(clip_frames, source.num_frames, source.frames_per_step)
        for target in TARGETS:
            if target == "direction" and len(labelled) < 2:
                continue  # one step: no displacement to classify
            scores = []
            for x_all in (features, noise):
                rows = target_rows(x_all, truths, labelled, target, grid=grid)
                scores.append(probe_accuracy(rows, rows.groups >= train_clips, seed=seed))
            row = ProbeRow(target, source.name, int(rows.x.shape[1]), *scores)
            report.rows.append(row)
            log.info(
                "probe_result",
                target=target,
                source=source.name,
                accuracy=round(row.score.accuracy, 4),
                noise=round(row.noise.accuracy, 4),
                uniform=round(row.score.uniform, 4),
                chosen_lambda=row.score.chosen_lambda,
            )
    return report


def probe_student(
    student: str,
    *,
    weights: str | None = None,
    encoder: str | None = None,
    features: str = "both",
    train_clips: int = 256,
    held_out_clips: int = 128,
    seed: int = 0,
    grid: int = 4,
    pool: int = 4,
    frames: int = 16,
    size: int = 64,
    batch_size: int = 32,
    device: str = "cpu",
) -> ProbeReport:
    """``vidalign probe``: SynthMotion clips of ``seed`` (``train_clips``, then
    ``held_out_clips``), the student's sources (:func:`load_sources`), :func:`run_probe`.

    Every argument is checked before the model loads, and the model loads before
    the clips are made, so a mistake costs no waiting.
    """
    from vidalign.data.synth import generate

    check_probe_args(
        train_clips=train_clips,
        held_out_clips=held_out_clips,
        grid=grid,
        pool=pool,
        batch_size=batch_size,
    )
    generate(0, seed=seed, frames=frames, size=size)  # checks frames, size and seed
    sources = load_sources(
        student, weights=weights, encoder=encoder, features=features, pool=pool, device=device
    )
    log.info(
        "probe_clips",
        train=train_clips,
        held_out=held_out_clips,
        seed=seed,
        frames=frames,
        size=size,
    )
    clips = generate(train_clips + held_out_clips, seed=seed, frames=frames, size=size)
    settings = {
        "student": student,
        "weights": weights or "",
        "encoder": encoder or "",
        "features": features,
        "pool": pool,
        "clips": {
            "train": train_clips,
            "held_out": held_out_clips,
            "seed": seed,
            "frames": frames,
            "size": size,
        },
    }
    return run_probe(
        sources,
        clips,
        train_clips=train_clips,
        seed=seed,
        grid=grid,
        batch_size=batch_size,
        settings=settings,
    )
