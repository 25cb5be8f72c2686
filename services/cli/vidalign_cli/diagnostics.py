"""The demo's diagnostics: is every link from teacher to answer working, before we read the table?

A null result of ``make demo`` says nothing if a link of the chain is broken: a
teacher that does not read its conditioning has nothing to teach, and a student
that does not read the video cannot show what it learned. So the demo measures
each link, before (and between) the training runs, against a threshold:

- **the student** (baseline eval): static-control accuracy by option likelihood,
  and the same questions with another clip's video (``vidalign.eval``'s
  substitution check): its choices should change;
- **the student's features** (``vidalign.probe``): where the objects are, read
  from the tokens the LLM reads, and which way they move from the grid-pooled F_V
  (what stage 2 trains through; headroom); after stage 2, how far each arm's
  encoder moved where the objects are;
- **the VDA teacher**, before anything trains, with its oracle adapter (W_proj fitted
  on each frame's clean latents pooled to 4 x 4, ``vidalign.vda.oracle``): can it
  read features at all? Then with +VDA's stage-1 adapter (``vidalign.gap.feature_gap``):
  its loss with each clip's own F_V vs another clip's, or the frames reversed;
- **the oracle ceiling** (after stage 3): the student with an encoder supervised on
  where every object is must answer motion questions better than stage 3 alone does,
  else no teacher could show a gain through it;
- **the teachers' captions**: AnimateDiff's loss with the motion words swapped
  (``vidalign.gap.caption_gap``) and CogVideoX's with another clip's caption or
  the motion words swapped (``vidalign.motionenhancer.diagnostics``).

Each becomes a :class:`Diagnostic`: a value, a :class:`Gate` (the threshold,
a module constant below with its reason) and a verdict, ``PASS`` or ``WARN``.
The demo never stops on a WARN (it is a report); ``results.md`` opens with the
table and its summary says which gates failed. The pure pieces (gates, verdicts,
tables) are unit-tested; ``measure_*``, ``probe_clips`` and ``probe`` load models.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vidalign.errors import InvalidInput

if TYPE_CHECKING:
    from vidalign.gap import Gap
    from vidalign.motionenhancer.diagnostics import CaptionGap
    from vidalign.probe import ProbeReport, ProbeRow

# --- thresholds ----------------------------------------------------------------------------

STATIC_LIKELIHOOD_MIN = 0.85
"""Static-control accuracy by likelihood: colour, shape and count are visible in every frame,
so a student that reads the video's content should get nearly all of them."""
SUBSTITUTION_SAME_MAX = 0.5
"""Static same-choice rate by likelihood with another clip's video: a reader changes its answer
whenever the other clip's answer differs (most questions); one that ignores the video keeps ~100%."""
PROBE_HEADROOM_MAX = 0.10
"""F_V direction accuracy at most 10 points over chance: if the features stage 2 trains already
carry which way the objects move, a null result after stage 2 says little (nothing to teach).
Direction, not position: F_V is the tokens the LLM reads, which must carry where the objects
are (:data:`PROBE_LLM_GAIN_MIN`) or the student could read nothing; how they move between
frames is what a motion teacher adds."""
PROBE_LLM_GAIN_MIN = 0.10
"""LLM-token position accuracy at least 10 points over chance: motion answers are built from
where the objects are, so the tokens the LLM reads must carry it."""
PROBE_CHANGE_SE = 2.0
"""+VDA's F_V position accuracy must beat its control's by two standard errors of the
difference (clustered by clip): less is within the probe's noise. Position, because a teacher
that reads each frame's F_V asks first where that frame's objects are."""
CEILING_SE = 2.0
"""The oracle ceiling's motion average by likelihood must beat stage 3 alone's (the same
student, data and stage 3, with no teacher) by two standard errors of the difference: less,
and the student, stage 3 and the scoring could not show a gain even if a teacher gave the
encoder motion. Against stage 3 alone rather than chance, because the baseline student
already answers some motion questions from a single frame."""
FEATURE_GAP_MIN = 0.05
"""The teacher's loss must rise >= 5% with another clip's F_V and with F_V's frames reversed:
below, stage 2's gradient carries little about the clip or its time order."""
ANIMATEDIFF_GAP_MIN = 0.01
"""AnimateDiff's loss must rise >= 1% with the motion words swapped over the alignment
timesteps: below, its conditioning carries no motion to pass to the encoder."""
COGVIDEOX_OTHER_GAP_MIN = 0.01
"""CogVideoX's loss must rise >= 1% with another clip's caption: else it ignores its caption."""
COGVIDEOX_SWAPPED_GAP_MIN = 0.0
"""...and rise at all (> 0) with the motion words swapped: else the motion tokens, whose
attention maps are MotionEnhancer's priors, carry nothing. A sign test only (the noise is
paired); the size is the other-caption gate's."""

FEATURE_GAP_GATED = ("other_clip", "reversed")
"""The ``feature_gap`` perturbations with a gate (the others are reported beside them)."""
PROBE_POOL = 4
"""Grid the LLM's tokens (and F_V) are pooled to per frame for the probe (``vidalign probe --pool``)."""
PROBE_FV = f"F_V grid:{PROBE_POOL}"
"""The probed source stage 2 trains through (the demo extracts F_V with ``grid:4`` pooling,
``DemoConfig.pooling``)."""
PROBE_LLM = f"LLM tokens grid:{PROBE_POOL}"
PROBE_SEED = 700_000
"""SynthMotion seed of the probe's clips: no demo model trains or is evaluated on it."""
PROBE_FRAMES, PROBE_SIZE = 16, 64
"""The probe's clips: SynthMotion's native frames and size (``vidalign probe``'s defaults)."""

PASS, WARN = "PASS", "WARN"

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt,
}


# --- gates and verdicts --------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    """A threshold: a value passes when ``value <op> bound``; a NaN value never passes."""

    op: str
    bound: float
    unit: str = "%"
    """How values print: ``%`` (a fraction, as percent), ``points`` (a fraction, as signed
    percentage points) or ``""`` (as is)."""
    digits: int = 1
    basis: str = ""
    """Where a computed bound comes from, printed after it (e.g. "2 se")."""

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise InvalidInput(f"gate: op must be one of {sorted(_OPS)}, got {self.op!r}")
        if self.unit not in ("%", "points", ""):
            raise InvalidInput(f"gate: unit must be '%', 'points' or '', got {self.unit!r}")

    def passes(self, value: float) -> bool:
        return not math.isnan(value) and _OPS[self.op](value, self.bound)

    def format(self, value: float) -> str:
        """``value`` in this gate's unit and precision."""
        if math.isnan(value):
            return "n/a"
        if self.unit == "%":
            return f"{100 * value:.{self.digits}f}%"
        if self.unit == "points":
            return f"{100 * value:+.{self.digits}f} points"
        return f"{value:.{self.digits}f}"

    @property
    def text(self) -> str:
        """The threshold as printed: ``>= 85.0%``, ``> +3.1 points (2 se)``."""
        return f"{self.op} {self.format(self.bound)}" + (f" ({self.basis})" if self.basis else "")

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "bound": self.bound, "text": self.text, "unit": self.unit,
                "digits": self.digits, "basis": self.basis}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Gate:
        """The gate :meth:`to_dict` wrote (``results.json``'s ``threshold``)."""
        return cls(record["op"], record["bound"], unit=record.get("unit", "%"),
                   digits=record.get("digits", 1), basis=record.get("basis", ""))


@dataclass(frozen=True)
class Diagnostic:
    """One measured link of the chain, its threshold and verdict."""

    name: str
    value: float
    gate: Gate
    warning: str
    """What a WARN means, in one sentence (printed with the verdict)."""
    detail: dict[str, Any] = field(default_factory=dict)
    """The numbers behind ``value`` (JSON-ready), for ``results.json``."""

    @property
    def passed(self) -> bool:
        return self.gate.passes(self.value)

    @property
    def verdict(self) -> str:
        return PASS if self.passed else WARN

    def line(self) -> str:
        """``PASS name: value (threshold ...)``, and for a WARN what it means."""
        value, threshold = self.gate.format(self.value), self.gate.text
        head = f"{self.verdict} {self.name}: {value} (threshold {threshold})"
        return head if self.passed else f"{head}: {self.warning}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": None if math.isnan(self.value) else self.value,
            "threshold": self.gate.to_dict(),
            "verdict": self.verdict,
            "warning": self.warning,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Diagnostic:
        """The diagnostic :meth:`to_dict` wrote (``results.json``'s ``diagnostics``)."""
        value = math.nan if record["value"] is None else record["value"]
        return cls(record["name"], value, Gate.from_dict(record["threshold"]), record["warning"],
                   record.get("detail", {}))


def diagnostics_over_seeds(per_seed: Mapping[int, Sequence[Diagnostic]]) -> str:
    """Markdown: each gate's value and verdict per seed, and how many seeds passed it.

    Rows follow the order the first seed printed them; a gate a seed did not reach
    (an earlier failure, another configuration) shows ``-`` and counts as not passed.
    A bound computed from each seed's data (2 standard errors) is given in each cell.
    """
    seeds = list(per_seed)
    by_seed = {seed: {d.name: d for d in found} for seed, found in per_seed.items()}
    names = list(dict.fromkeys(d.name for found in per_seed.values() for d in found))
    lines = ["| diagnostic | threshold | " + " | ".join(f"seed {s}" for s in seeds) + " | passed |",
             "|---|---|" + "---:|" * len(seeds) + "---:|"]
    for name in names:
        got = [by_seed[seed].get(name) for seed in seeds]
        texts = list(dict.fromkeys(d.gate.text for d in got if d is not None))
        shared = len(texts) == 1
        cells = [f"{d.gate.format(d.value)} {d.verdict}" + ("" if shared else f" ({d.gate.text})")
                 if d else "-" for d in got]
        threshold = texts[0] if shared else "per seed"
        passed = sum(1 for d in got if d is not None and d.passed)
        lines.append(f"| {name} | {threshold} | " + " | ".join(cells)
                     + f" | {passed} of {len(seeds)} |")
    return "\n".join(lines) + "\n"


def diagnostics_table(diagnostics: Sequence[Diagnostic]) -> str:
    """Markdown: ``diagnostic | value | threshold | verdict``, one row each."""
    lines = ["| diagnostic | value | threshold | verdict |", "|---|---:|---|---|"]
    for d in diagnostics:
        lines.append(f"| {d.name} | {d.gate.format(d.value)} | {d.gate.text} | {d.verdict} |")
    return "\n".join(lines) + "\n"


def gates_summary(diagnostics: Sequence[Diagnostic]) -> str:
    """How many gates passed, then (a Markdown list) each that did not, with what it means."""
    failed = [d for d in diagnostics if not d.passed]
    head = f"{len(diagnostics) - len(failed)} of {len(diagnostics)} diagnostic gates passed"
    if not failed:
        return f"{head}.\n"
    return f"{head}; failed:\n\n" + "".join(f"- {d.name}: {d.warning}\n" for d in failed)


# --- the diagnostics, from what was measured -------------------------------------------------


def _static_accuracy(score: Mapping[str, Any]) -> float:
    """Static-control accuracy of a ``score_dict``; NaN when it has no static questions."""
    from vidalign.data.synth import STATIC_CATEGORY

    category = score.get("categories", {}).get(STATIC_CATEGORY)
    return math.nan if not category else float(category["accuracy"])


def student_diagnostics(summary: Mapping[str, Any]) -> list[Diagnostic]:
    """From the baseline's eval summary (``vidalign.eval.result_dict``, run with an option
    scorer and ``substitute=True``): static accuracy by likelihood and the substitution check."""
    likelihood = summary.get("likelihood")
    substitution = (summary.get("substitution") or {}).get("likelihood")
    if likelihood is None or substitution is None:
        raise InvalidInput("student diagnostics: the eval ran without an option scorer or "
                           "without substitute=True")
    same, swapped = substitution["same_choice"], substitution["accuracy"]
    return [
        Diagnostic(
            "student: static control accuracy by likelihood (baseline)",
            _static_accuracy(likelihood),
            Gate(">=", STATIC_LIKELIHOOD_MIN),
            "the student does not read the scene (colour, shape, count) from the video, so "
            "no training of its encoder can show in its answers",
            {"static_letter": _static_accuracy(summary)},
        ),
        Diagnostic(
            "student: static same-choice rate with another clip's video (baseline, likelihood)",
            _static_accuracy(same),
            Gate("<=", SUBSTITUTION_SAME_MAX),
            "the student's answers do not depend on the video: it answers from the question",
            {"static_accuracy_with_other_video": _static_accuracy(swapped),
             "motion_same_choice": same["average"],
             "static_same_choice_letter": _static_accuracy(
                 summary["substitution"]["letter"]["same_choice"])},
        ),
    ]


def probe_row(report: ProbeReport, target: str, source: str) -> ProbeRow:
    """The row of ``report`` for ``target`` on ``source``."""
    for row in report.rows:
        if row.target == target and row.source == source:
            return row
    raise InvalidInput(f"probe: no {target} row for {source!r} (sources: "
                       f"{sorted({r.source for r in report.rows})})")


def _over_chance(row: ProbeRow) -> tuple[float, dict[str, float]]:
    """Accuracy minus chance (the larger of majority and uniform), and the numbers behind it."""
    s = row.score
    chance = max(s.majority, s.uniform)
    return s.accuracy - chance, {"accuracy": s.accuracy, "stderr": s.stderr, "chance": chance,
                                 "majority": s.majority, "uniform": s.uniform,
                                 "noise": row.noise.accuracy}


def probe_diagnostics(report: ProbeReport) -> list[Diagnostic]:
    """Direction over chance from F_V (headroom for stage 2); position over chance from the
    LLM's tokens (what the student can read)."""
    fv, fv_detail = _over_chance(probe_row(report, "direction", PROBE_FV))
    llm, llm_detail = _over_chance(probe_row(report, "position", PROBE_LLM))
    return [
        Diagnostic(
            f"probe: {PROBE_FV} direction accuracy over chance (baseline)",
            fv, Gate("<=", PROBE_HEADROOM_MAX, unit="points"),
            "F_V already carries which way the objects move: stage 2 has little to teach",
            fv_detail,
        ),
        Diagnostic(
            f"probe: {PROBE_LLM} position accuracy over chance (baseline)",
            llm, Gate(">=", PROBE_LLM_GAIN_MIN, unit="points"),
            "the tokens the LLM reads do not carry where the objects are, so it cannot answer "
            "motion questions from them",
            llm_detail,
        ),
    ]


def probe_change_diagnostic(
    reports: Mapping[str, ProbeReport], arm: str, control: str, labels: Mapping[str, str]
) -> Diagnostic:
    """``arm``'s F_V position accuracy minus ``control``'s, against
    :data:`PROBE_CHANGE_SE` standard errors of the difference."""
    a, c = (probe_row(reports[k], "position", PROBE_FV).score for k in (arm, control))
    se = math.hypot(a.stderr, c.stderr)
    return Diagnostic(
        f"probe: {PROBE_FV} position, {labels[arm]} minus {labels[control]} after stage 2",
        a.accuracy - c.accuracy,
        Gate(">", PROBE_CHANGE_SE * se, unit="points", basis=f"{PROBE_CHANGE_SE:g} se"),
        f"stage 2 through the teacher moved F_V no more than the {labels[control]} control did",
        {"arm": a.accuracy, "control": c.accuracy, "se_difference": se},
    )


def ceiling_diagnostic(
    ceiling: Mapping[str, Any], control: Mapping[str, Any], chance: float
) -> Diagnostic:
    """The oracle ceiling's motion average by likelihood minus stage 3 alone's (``control``),
    against :data:`CEILING_SE` standard errors of that difference; ``chance`` (the mean of
    1 / options over the motion questions) is reported beside it.

    The standard error is the two-proportion one under "no difference", per category
    (``2 p (1 - p) / n`` with ``p`` the two arms' pooled accuracy), averaged over the
    categories as the macro average is. Both arms answer the same questions, so their errors
    are positively correlated and the true error of the difference is smaller: the gate is
    conservative, never lenient."""
    if not 0 < chance < 1:
        raise InvalidInput(f"chance: expected a probability in (0, 1), got {chance}")
    score, alone = ceiling.get("likelihood"), control.get("likelihood")
    if score is None or alone is None:
        raise InvalidInput("ceiling diagnostic: the evals ran without an option scorer")
    from vidalign.data.synth import MOTION_CATEGORIES

    cats = [c for c in MOTION_CATEGORIES if c in score["categories"]]
    if not cats:
        raise InvalidInput("ceiling diagnostic: the eval has no motion questions")
    variance = 0.0
    for c in cats:
        a, b = score["categories"][c], alone["categories"].get(c)
        if b is None or b["n"] != a["n"]:
            raise InvalidInput(f"ceiling diagnostic: {c!r} was not asked the same questions in both evals")
        pooled = (a["correct"] + b["correct"]) / (2 * a["n"])
        variance += 2 * pooled * (1 - pooled) / a["n"]
    se = math.sqrt(variance) / len(cats)
    return Diagnostic(
        "oracle ceiling: motion average by likelihood minus stage 3 alone",
        score["average"] - alone["average"],
        Gate(">", CEILING_SE * se, unit="points", basis=f"{CEILING_SE:g} se"),
        "even an encoder told where every object is in every frame lifts motion answers no "
        "more than stage 3 alone: no teacher could show a gain through this student",
        {"ceiling": score["average"], "stage3_alone": alone["average"], "chance": chance,
         "ceiling_over_chance": score["average"] - chance, "se_difference": se},
    )


STAGE1_SOURCE = "+VDA stage-1 adapter"
ORACLE_SOURCE = "oracle features, 4 x 4 clean latents"


def feature_gap_diagnostics(
    gaps: Mapping[str, Sequence[Gap]], source: str = STAGE1_SOURCE
) -> list[Diagnostic]:
    """The gated ``feature_gap`` perturbations (:data:`FEATURE_GAP_GATED`), each the mean
    relative gap over timesteps; the detail holds every perturbation's. ``source`` names
    the features and adapter (+VDA's stage 1, or the oracle's)."""
    from vidalign.gap import mean_relative

    means = {how: mean_relative(per_t) for how, per_t in gaps.items()}
    timesteps = [g.timestep for g in next(iter(gaps.values()))]
    what = {"other_clip": "another clip's F_V", "reversed": "F_V's frames reversed"}
    if source == ORACLE_SOURCE:
        why = (" even from features that hold the answer: no encoder can teach through this "
               "teacher and conditioning route")
    else:
        why = ", so stage 2 cannot teach the encoder through it"
    return [
        Diagnostic(
            f"VDA teacher feature gap, {what[how]} ({source})",
            means[how], Gate(">=", FEATURE_GAP_MIN, digits=3),
            f"the teacher barely reads {'F_V' if how == 'other_clip' else 'the order of F_V'}{why}",
            {"mean_relative": means, "timesteps": timesteps},
        )
        for how in FEATURE_GAP_GATED
    ]


def animatediff_gap_diagnostic(gaps: Sequence[Gap], timestep_range: Sequence[int]) -> Diagnostic:
    """AnimateDiff's caption gap (motion words swapped), mean over the alignment timesteps."""
    lo, hi = timestep_range
    aligned = [g.relative for g in gaps if lo <= g.timestep < hi]
    mean = sum(aligned) / len(aligned) if aligned else math.nan
    return Diagnostic(
        f"AnimateDiff caption gap, motion words swapped (t in [{lo}, {hi}))",
        mean, Gate(">=", ANIMATEDIFF_GAP_MIN, digits=3),
        "the teacher cannot pass motion through its conditioning",
        {"timesteps": [g.timestep for g in gaps if lo <= g.timestep < hi]},
    )


def cogvideox_gap_diagnostics(gap: CaptionGap) -> list[Diagnostic]:
    """CogVideoX's caption gap: another clip's caption, and the motion words swapped."""
    warning = "MotionEnhancer's priors come from a teacher that does not read its caption"
    detail = {"clips": gap.clips, "timesteps": [g.timestep for g in gap.per_timestep]}
    return [
        Diagnostic("CogVideoX caption gap, another clip's caption", gap.other_gap,
                   Gate(">=", COGVIDEOX_OTHER_GAP_MIN, digits=3), warning, detail),
        Diagnostic("CogVideoX caption gap, motion words swapped", gap.swapped_gap,
                   Gate(">", COGVIDEOX_SWAPPED_GAP_MIN, digits=3),
                   f"{warning}'s motion words", detail),
    ]


def feature_gap_text(gaps: Mapping[str, Sequence[Gap]], source: str = STAGE1_SOURCE) -> str:
    """The printed feature gap: per timestep, the loss with each clip's own F_V and the
    relative gap of every perturbation."""
    hows = list(gaps)
    lines = [f"\nfeature gap of the VDA teacher ({source}; loss with spoilt F_V "
             "vs each clip's own; same noise):",
             f"{'timestep':>8} {'own F_V':>10} " + " ".join(f"{h:>12}" for h in hows)]
    for k, own in enumerate(gaps[hows[0]]):
        lines.append(f"{own.timestep:>8} {own.true_loss:>10.5f} "
                     + " ".join(f"{gaps[h][k].relative:>+12.3%}" for h in hows))
    return "\n".join(lines) + "\n"


def cogvideox_gap_text(gap: CaptionGap) -> str:
    """The printed CogVideoX caption gap: per timestep, the loss under each caption and the gaps."""
    lines = ["\ncaption gap of the CogVideoX teacher (v-loss with another clip's caption or the "
             "motion words swapped vs the clip's own; same noise):",
             f"{'timestep':>8} {'own':>10} {'other':>10} {'swapped':>10} {'other gap':>10} "
             f"{'swap gap':>10}"]
    for g in gap.per_timestep:
        lines.append(f"{g.timestep:>8} {g.own_loss:>10.5f} {g.other_loss:>10.5f} "
                     f"{g.swapped_loss:>10.5f} {g.other_gap:>+10.3%} {g.swapped_gap:>+10.3%}")
    return "\n".join(lines) + "\n"


def probe_table(reports: Mapping[str, ProbeReport], labels: Mapping[str, str]) -> str:
    """Markdown: per probed run, F_V position and direction accuracy (± se) and the change
    from the first run (the baseline); the last row is chance (majority, uniform)."""
    first = next(iter(reports.values()))
    targets = ("position", "direction")
    head = "| run | " + " | ".join(f"{PROBE_FV} {t} | change" for t in targets) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(targets))]
    for name, report in reports.items():
        cells = []
        for target in targets:
            s = probe_row(report, target, PROBE_FV).score
            base = probe_row(first, target, PROBE_FV).score
            cells += [f"{100 * s.accuracy:.1f} ± {100 * s.stderr:.1f}",
                      f"{100 * (s.accuracy - base.accuracy):+.1f}"]
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    chance = [probe_row(first, t, PROBE_FV).score for t in targets]
    cells = [c for s in chance for c in (f"{100 * s.majority:.1f} / {100 * s.uniform:.1f}", "")]
    lines.append("| chance (majority / uniform) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- measuring (models load here) -------------------------------------------------------------


def probe_clips(train_clips: int, held_out_clips: int) -> list:
    """The probe's SynthMotion clips: ``train_clips`` fit the probes, the rest score them."""
    from vidalign.data.synth import generate
    from vidalign.probe import check_probe_args

    check_probe_args(train_clips=train_clips, held_out_clips=held_out_clips, grid=4)
    return generate(train_clips + held_out_clips, seed=PROBE_SEED, frames=PROBE_FRAMES,
                    size=PROBE_SIZE)


def probe(
    student: str, clips: Sequence[Any], *, train_clips: int, weights: str, encoder: str = "",
    sources: Sequence[str] = (PROBE_FV,), seed: int = 0,
) -> ProbeReport:
    """``vidalign.probe`` on ``clips`` for the named ``sources`` only (the others are not
    extracted: the grid sources cost most of a full probe's time). With LLM sources the whole
    VideoLLM loads; with F_V sources alone only its tower. ``encoder``: a stage-2 artifact."""
    from vidalign.probe import load_sources, run_probe

    features = "both" if any(s.startswith("LLM") for s in sources) else "fv"
    loaded = {s.name: s for s in load_sources(student, weights=weights, encoder=encoder or None,
                                              features=features, pool=PROBE_POOL)}
    missing = [s for s in sources if s not in loaded]
    if missing:
        raise InvalidInput(f"probe: no source {missing} (has {sorted(loaded)})")
    settings = {"student": student, "weights": weights, "encoder": encoder, "features": features,
                "pool": PROBE_POOL, "clips": {"train": train_clips,
                                              "held_out": len(clips) - train_clips,
                                              "seed": PROBE_SEED, "frames": PROBE_FRAMES,
                                              "size": PROBE_SIZE}}
    return run_probe([loaded[s] for s in sources], clips, train_clips=train_clips, seed=seed,
                     settings=settings)


def measure_feature_gap(
    address: str, *, adapter: str, features_uri: str, train_dir: Path, clips: int, frames: int,
    size: int, timesteps: Sequence[int], seed: int, draws: int = 2, text: bool = True,
) -> dict[str, list[Gap]]:
    """``feature_gap`` through the teacher service at ``address`` (which has ``adapter``
    loaded) on the first ``clips`` post-training clips: their stage-1 F_V (``features_uri``,
    what stage 1 fitted the adapter to and stage 2 starts from), their pixels at the teacher's
    frames and size, and their static captions when stage 2 conditions on text."""
    from vidalign.data.synthset import load_synth_set
    from vidalign.gap import feature_gap
    from vidalign.teacher.client import connect
    from vidalign.vda import Adapter
    from vidalign.video import sample_frames
    from vidalign_trainer.features import load_features
    from vidalign_trainer.stage2 import resolve_adapter_id

    data = load_synth_set(train_dir, num_clips=clips, frames=frames, size=size)
    features = load_features(features_uri).get(data.ids)
    teacher = connect(address)
    try:
        info = teacher.info()
        return feature_gap(
            teacher, data.ids, features, adapter_id=resolve_adapter_id(adapter),
            frame_tokens=Adapter.load(adapter).frame_tokens,
            pixels=sample_frames(data.videos, info.frames, info.resolution),
            captions=data.static_captions if text else None,
            timesteps=timesteps, seed=seed, draws=draws,
        )
    finally:
        teacher.close()


def measure_oracle_gap(
    teacher_dir: Path, adapter: Path, *, train_dir: Path, clips: int, frames: int, size: int,
    timesteps: Sequence[int], seed: int, draws: int = 2,
) -> dict[str, list[Gap]]:
    """The oracle adapter's ``feature_gap`` (``vidalign.vda.oracle``), in this process, on the
    first ``clips`` post-training clips (never seen by its fit, which used the pretraining
    clips): their latents, oracle features and static captions."""
    import torch

    from vidalign.data.synthset import load_synth_set
    from vidalign.vda import load_teacher
    from vidalign.vda.oracle import oracle_feature_gap
    from vidalign.video import sample_frames

    teacher = load_teacher("tiny-animatediff", base=str(teacher_dir))
    data = load_synth_set(train_dir, num_clips=clips, frames=frames, size=size)
    with torch.no_grad():
        latents = teacher.encode_video(sample_frames(data.videos, teacher.frames, teacher.resolution))
    return oracle_feature_gap(teacher, str(adapter), latents, list(data.static_captions),
                              timesteps=timesteps, seed=seed, draws=draws)


def measure_cogvideox_gap(
    weights: Path, model: str, *, train_dir: Path, clips: int, frames: int, size: int,
    timesteps: Sequence[int], seed: int,
) -> CaptionGap:
    """``caption_gap`` of the CogVideoX teacher at ``weights`` (loaded in this process) on the
    first ``clips`` post-training clips and their captions, two noise draws each."""
    from vidalign.data.synthset import load_synth_set
    from vidalign.motionenhancer import load_cogvideox
    from vidalign.motionenhancer.diagnostics import caption_gap

    data = load_synth_set(train_dir, num_clips=clips, frames=frames, size=size)
    teacher = load_cogvideox(model, repo=str(weights))
    return caption_gap(teacher, data.videos, data.captions, timesteps=list(timesteps),
                       seeds=(seed, seed + 1))
