"""Make the demo's small pretrained models (``make demo-assets``) into ``assets/demo``.

No checkpoint can be downloaded here, so the demo ships its own, made the way
the real ones are, at toy scale, on SynthMotion clips that neither the demo's
post-training nor its evaluation uses:

- ``animatediff/base``: the tiny AnimateDiff (UNet + motion module; a CLIP
  text encoder over a word-level tokenizer of SynthMotion's vocabulary; VAE
  scaling factor calibrated to unit-variance latents) after text-to-video
  pretraining on (clip, full caption) pairs;
- ``cogvideox``: the tiny CogVideoX (transformer + T5) after the same, in its
  own v-prediction objective;
- ``videollm/model``: a small Video-LLaVA (the tiny preset's classes, wider,
  with a word-level tokenizer over SynthMotion's closed vocabulary) whose
  vision tower was pretrained on single-frame static objectives, per frame
  and per token (``static_pretrain(cells=, augment=True)``) on clips of their
  own, then instruction-tuned (tower frozen) on SynthMotion questions;
- ``MANIFEST.json``: how each was made (seeds, steps, losses) and file digests.

    python scripts/demo_assets.py [--out assets/demo] [--quick] [--only PART]
        [--work DIR] [--size KEY=VALUE ...]

``--quick`` makes a few-step version for tests (minutes -> seconds); its
models have learned nothing. Everything is seeded: the same command gives the
same numbers on the same machine type.

Long builds (hours of CPU) checkpoint into ``--work`` (default
``runs/demo-assets-work``) every ``--checkpoint-every`` steps, and the same
command run again goes on from the newest checkpoint of each training phase,
so a build can span several sessions; a finished part is written to ``--out``
only at its end. ``--size`` overrides a ``Sizes`` field (e.g.
``--size teacher_steps=2000``); change sizes only with a fresh ``--work``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vidalign.log import configure_logging, get_logger

log = get_logger("vidalign.demo_assets")

PRETRAIN_SEED = 1
"""SynthMotion seed of the pretraining clips (the demo post-trains on 500000+s, evaluates on 999999)."""
VOCAB_SEED = 2
"""SynthMotion seed of the clips whose text makes the student's word vocabulary."""
STATIC_SEED = 3
"""SynthMotion seed of the frames the student's tower is pretrained on (``Sizes.static_clips``)."""


@dataclass
class Sizes:
    clips: int = 512
    teacher_steps: int = 1000
    teacher_batch: int = 4
    teacher_lr: float = 2e-3
    x0_weight_cap: float = 1000.0
    """Weight min(1/SNR, cap): above t ~ 700 the loss is the error on the clean latents."""
    cogvideox_steps: int = 30000
    """600 steps left a teacher that did not read its motion words (caption gap with them swapped
    0 to every digit); at 30,000 the gap is +0.4..3.5% (README, Results)."""
    static_steps: int = 6000
    """Twice as many (12,000) did not help the student: static accuracy by likelihood on the
    demo's 48 held-out clips 56.2% (colour 37.5, shape 33.3, count 97.9) against 57.6% (46, 31,
    96), though the tower alone names the shape centred in a cell better with more steps."""
    static_lr: float = 3e-3
    static_clips: int = 8192
    """Clips the tower's static pretraining sees (one seed apart from the others): with the
    512 of the rest, the tower learnt each clip's shapes by heart (the shape of the object
    centred in a cell: 90% on its clips, 27% on others)."""
    static_cells: float = 1.0
    """Weight of the per-cell heads (``static_pretrain(cells=)``): the tokens the LLM reads
    must say which object is where, not only which colours the frame holds."""
    instruct_steps: int = 2500
    instruct_data: str = "pretraining"
    """Whose questions instruction-tune the student: ``"pretraining"``, the ``clips`` the
    teachers learnt from (4,608 questions, each drawn about nine times), or ``"static"``, the
    ``static_clips`` the tower was pretrained on (2,500 steps of 16 draw about half of their
    73,728 questions, once each). On a tower of 12,000 static steps, static accuracy by
    likelihood on the demo's 48 held-out clips was 56.2% and 55.6%; on 48 of the pretraining
    clips 77.1% and 59.7%: more questions stopped the memorising, and at 2,500 steps raised
    nothing held out. With 6,000 steps on ``"static"``: 62.5% held out (README, Results), not
    yet the shipped student's recipe."""
    student_batch: int = 16
    oracle_clips: int = 256
    oracle_steps: int = 200
    oracle_lr: float = 1e-2
    oracle_batch: int = 8
    llm_width: int = 128
    llm_layers: int = 4
    vision_width: int = 128
    vision_layers: int = 4
    """Tower layers; Video-LLaVA reads the second-to-last layer's output, so 4 leaves three."""
    student_size: int = 32
    """Frame size the student is made at (its tower's ``image_size``; the clips are decoded to
    it). 64 with ``student_patch=16`` keeps 4 x 4 tokens a frame with 4x the pixels."""
    student_patch: int = 8

    def __post_init__(self) -> None:
        if self.instruct_data not in ("static", "pretraining"):
            raise ValueError(f"instruct_data: expected 'static' or 'pretraining', got {self.instruct_data!r}")


PARTS = ("animatediff", "oracle", "cogvideox", "videollm")
"""What ``build`` makes, in order: ``oracle`` reads ``animatediff``'s base teacher."""

QUICK = Sizes(clips=16, teacher_steps=2, cogvideox_steps=2, static_steps=2, static_clips=16, instruct_steps=2,
              student_batch=4, oracle_clips=4, oracle_steps=2, oracle_batch=2)


def student_config(sizes: Sizes):
    """The tiny Video-LLaVA config, wider: the baseline must be able to learn the task."""
    from vidalign.students.video_llava import tiny_video_llava_config

    config = tiny_video_llava_config()
    w, v = sizes.llm_width, sizes.vision_width
    config.text_config.hidden_size = w
    config.text_config.intermediate_size = 2 * w
    config.text_config.num_hidden_layers = sizes.llm_layers
    config.text_config.num_attention_heads = config.text_config.num_key_value_heads = max(2, w // 32)
    config.vision_config.hidden_size = v
    config.vision_config.num_hidden_layers = sizes.vision_layers
    size, patch = sizes.student_size, sizes.student_patch
    if size % patch:
        raise ValueError(f"student_size {size} is not a multiple of student_patch {patch}")
    frames = config.video_seq_length // (config.image_seq_length + 1)  # a frame: its patches + CLS
    config.vision_config.image_size, config.vision_config.patch_size = size, patch
    config.image_seq_length = (size // patch) ** 2
    config.video_seq_length = frames * (config.image_seq_length + 1)
    config.vision_config.intermediate_size = 2 * v
    config.vision_config.num_attention_heads = max(2, v // 32)
    return config


@dataclass
class Work:
    """Where each training phase checkpoints (``dir/<phase>``), and how often."""

    dir: Path | None = None
    checkpoint_every: int = 250

    def schedule(self, phase: str, **fields):
        """The phase's ``Schedule``, checkpointing under ``dir`` (resumed from there)."""
        from vidalign_trainer.pretrain import Schedule

        if self.dir is None:
            return Schedule(**fields)
        return Schedule(**fields, out=str(self.dir / phase), checkpoint_every=self.checkpoint_every)

    def losses(self, phase: str, returned: list[float]) -> list[float]:
        """Every step's loss of the phase: from its metrics log when it checkpoints (a resumed
        run returns only the steps it ran itself), the last record of a step winning."""
        path = None if self.dir is None else self.dir / phase / "metrics.jsonl"
        if path is None or not path.is_file():
            return returned
        by_step = {}
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if "loss" in record:
                    by_step[record["step"]] = record["loss"]
        return [by_step[k] for k in sorted(by_step)]


WORK = Work()


def make_teacher(out: Path, videos: torch.Tensor, captions: list[str], sizes: Sizes, seed: int) -> dict:
    from vidalign.vda import load_teacher
    from vidalign.video import sample_frames
    from vidalign_trainer.pretrain import (
        DEMO_TEXT_WINDOW,
        calibrate_latent_scale,
        text_to_video,
        word_text_encoder,
    )

    teacher = load_teacher("tiny-animatediff")
    word_text_encoder(teacher, synth_texts(), DEMO_TEXT_WINDOW, seed=seed)
    pixels = sample_frames(videos[:64], teacher.frames, teacher.resolution)
    factor = calibrate_latent_scale(teacher.vae, lambda: teacher.encode_video(pixels))
    losses = WORK.losses("animatediff", text_to_video(teacher, videos, captions, WORK.schedule(
        "animatediff", steps=sizes.teacher_steps, batch_size=sizes.teacher_batch, lr=sizes.teacher_lr,
        seed=seed), x0_weight_cap=sizes.x0_weight_cap))
    teacher.save_pretrained(out / "animatediff" / "base")
    return {"steps": sizes.teacher_steps, "batch": sizes.teacher_batch,
            "x0_weight_cap": sizes.x0_weight_cap, "vae_scaling_factor": round(factor, 6),
            "loss_first_50": _mean(losses[:50]), "loss_last_50": _mean(losses[-50:])}


def make_oracle(out: Path, data, sizes: Sizes, seed: int) -> dict:
    """The VDA teacher's oracle adapter (``vidalign.vda.oracle``): W_proj of ``spatial``
    conditioning fitted, as stage 1 would, on each frame's clean latents pooled to 4 x 4,
    from ``animatediff/base``. The demo measures its feature gap on clips it never saw:
    whether this teacher can read F_V at all."""
    from vidalign.vda import load_teacher
    from vidalign.vda.oracle import fit_oracle_adapter
    from vidalign.video import sample_frames

    teacher = load_teacher("tiny-animatediff", base=str(out / "animatediff" / "base"))
    n = min(sizes.oracle_clips, len(data))
    pixels = sample_frames(data.videos[:n], teacher.frames, teacher.resolution)
    with torch.no_grad():
        latents = torch.cat([teacher.encode_video(pixels[i:i + 32]) for i in range(0, n, 32)])
        text = teacher.encode_text(list(data.static_captions[:n]))
    fit = fit_oracle_adapter(teacher, latents, text, steps=sizes.oracle_steps, lr=sizes.oracle_lr,
                             batch_size=sizes.oracle_batch, seed=seed)
    (out / "oracle").mkdir(parents=True, exist_ok=True)
    digest = fit.adapter.save(out / "oracle" / "adapter.safetensors")
    return {"steps": sizes.oracle_steps, "clips": n, "lr": sizes.oracle_lr, "adapter": digest,
            "loss_first_25": _mean(fit.losses[:25]), "loss_last_25": _mean(fit.losses[-25:])}


def make_cogvideox(out: Path, videos: torch.Tensor, captions: list[str], sizes: Sizes, seed: int) -> dict:
    from vidalign.motionenhancer import load_cogvideox
    from vidalign.video import sample_frames
    from vidalign_trainer.pretrain import calibrate_latent_scale, text_to_video_cogvideox

    teacher = load_cogvideox("tiny-cogvideox")
    clips = sample_frames(videos[:64], teacher.spec.frames, teacher.spec.height)
    factor = calibrate_latent_scale(
        teacher.vae, lambda: torch.cat([teacher.encode_video(c.numpy()) for c in clips])
    )
    losses = WORK.losses("cogvideox", text_to_video_cogvideox(teacher, videos, captions, WORK.schedule(
        "cogvideox", steps=sizes.cogvideox_steps, batch_size=sizes.teacher_batch, lr=1e-3, seed=seed)))
    teacher.save_pretrained(out / "cogvideox")
    return {"steps": sizes.cogvideox_steps, "vae_scaling_factor": round(factor, 6),
            "loss_first_50": _mean(losses[:50]), "loss_last_50": _mean(losses[-50:])}


def synth_texts() -> list[str]:
    """Every word SynthMotion writes: the captions and questions of 2000 clips."""
    from vidalign.data.synth import generate

    clips = generate(2000, seed=VOCAB_SEED, frames=16, size=32)
    return [c.caption for c in clips] + [q.text for c in clips for q in c.questions]


def word_tokenizer(family):
    """A word-level tokenizer over SynthMotion's closed vocabulary, the family's chat template,
    the evaluation's letter instruction and the demo's other prompts."""
    from vidalign.data.benchmarks.prompts import LETTER_INSTRUCTION
    from vidalign.data.synthset import ANSWER_FORMAT
    from vidalign.students.tokenizer import build_word_tokenizer
    from vidalign_trainer.common import CAPTION_PROMPT

    chat = family.chat_template.replace("{", " ").replace("}", " ")  # its literal words
    texts = [*synth_texts(), LETTER_INSTRUCTION, CAPTION_PROMPT, chat,
             ANSWER_FORMAT.format(option="", letter="A")]
    return build_word_tokenizer(texts, family.tiny_specials, family.chat_template, eos=family.tiny_eos)


def make_student(out: Path, data, static_data, sizes: Sizes, seed: int) -> dict:
    """The baseline student: its tower pretrained on ``static_data``'s frames, then instruction-tuned
    (tower frozen) on the questions of ``static_data`` or ``data`` (``Sizes.instruct_data``)."""
    from transformers import VideoLlavaForConditionalGeneration

    from vidalign.students import VideoLLM, get_family, get_student_spec
    from vidalign_trainer.pretrain import instruction_tune, static_pretrain

    spec = get_student_spec("tiny-videollava")
    family = get_family(spec)
    tokenizer = word_tokenizer(family)
    config = student_config(sizes)
    config.text_config.vocab_size = max(tokenizer.get_vocab().values()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VideoLlavaForConditionalGeneration(config).eval()
    llm = VideoLLM(spec=spec, model=model, tokenizer=tokenizer, encoder=family.encoder(spec, model))
    cells = family.encoder(spec, model, pooling=f"grid:{llm.encoder.patch_grid}")  # the LLM's tokens
    static = WORK.losses("static", static_pretrain(
        cells, static_data.videos, static_data.truths, WORK.schedule(
            "static", steps=sizes.static_steps, batch_size=sizes.student_batch, lr=sizes.static_lr,
            seed=seed), cells=sizes.static_cells, augment=True))
    tune = static_data if sizes.instruct_data == "static" else data
    examples = [(q.clip, q.prompt, q.target) for q in tune.qa]
    instruct = WORK.losses("instruct", instruction_tune(llm, tune.videos, examples, WORK.schedule(
        "instruct", steps=sizes.instruct_steps, batch_size=sizes.student_batch, lr=1e-3, seed=seed)))
    target = out / "videollm" / "model"
    llm.model.save_pretrained(target)
    llm.tokenizer.save_pretrained(target)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "static_steps": sizes.static_steps, "static_loss_first_50": _mean(static[:50]),
        "static_loss_last_50": _mean(static[-50:]),
        "instruct_steps": sizes.instruct_steps, "instruct_data": sizes.instruct_data,
        "instruct_examples": len(examples),
        "instruct_loss_first_50": _mean(instruct[:50]), "instruct_loss_last_50": _mean(instruct[-50:]),
    }


def override(sizes: Sizes, pairs: list[str]) -> Sizes:
    """``sizes`` with ``KEY=VALUE`` fields replaced (ValueError naming a bad one)."""
    fields = asdict(sizes)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--size {pair!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        try:
            fields[key] = type(fields[key])(value)
        except ValueError:
            raise ValueError(f"--size {pair!r}: {value!r} is not a {type(fields[key]).__name__}") from None
    return Sizes(**fields)


def _mean(values: list[float]) -> float:
    return round(sum(values) / max(1, len(values)), 5)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file() and p.name != "MANIFEST.json"
    }


def build(out: Path, sizes: Sizes, *, seed: int = 0, only: list[str] | None = None) -> dict:
    from vidalign.data.synth import generate, write_dataset
    from vidalign.data.synthset import load_synth_set

    out.mkdir(parents=True, exist_ok=True)
    parts = list(only or PARTS)
    if "animatediff" in parts and "oracle" not in parts:
        parts.append("oracle")  # the oracle adapter is fitted to the base teacher
    manifest_path = out / "MANIFEST.json"
    summary: dict = {}
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as static_dir:
        tic = time.monotonic()
        write_dataset(generate(sizes.clips, seed=PRETRAIN_SEED, frames=16, size=64), tmp)
        data = load_synth_set(tmp, frames=16, size=32)
        log.info("pretraining_clips", clips=len(data), questions=len(data.qa),
                 seconds=round(time.monotonic() - tic, 1))
        for part in parts:
            tic = time.monotonic()
            shutil.rmtree(out / part, ignore_errors=True)
            if part == "animatediff":
                info = make_teacher(out, data.videos, data.captions, sizes, seed)
            elif part == "oracle":
                info = make_oracle(out, data, sizes, seed)
            elif part == "cogvideox":
                info = make_cogvideox(out, data.videos, data.captions, sizes, seed)
            elif part == "videollm":
                write_dataset(generate(sizes.static_clips, seed=STATIC_SEED, frames=16, size=64),
                              static_dir)
                info = make_student(out, data if sizes.student_size == 32 else load_synth_set(
                    tmp, frames=16, size=sizes.student_size), load_synth_set(
                    static_dir, frames=16, size=sizes.student_size), sizes, seed)
            else:
                raise SystemExit(f"--only: unknown part {part!r}")
            info["seconds"] = round(time.monotonic() - tic, 1)
            info["sizes"] = asdict(sizes)
            info["seed"] = seed
            summary[part] = info
            log.info("asset_done", part=part, **info)
    # Re-read now: other parts may have been remade meanwhile (--only in parallel processes).
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    summary = {**previous.get("summary", {}), **summary}
    manifest = {
        "producer": "scripts/demo_assets.py",
        "pretraining_data": {"synthmotion_seed": PRETRAIN_SEED, "clips": sizes.clips,
                             "frames": 16, "size": 32},
        "summary": summary,
        "files": _digests(out),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="assets/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps each (tests)")
    parser.add_argument("--only", action="append", choices=list(PARTS),
                        help="remake only this part (repeatable); the others are kept")
    parser.add_argument("--work", type=Path, default=Path("runs/demo-assets-work"),
                        help="where training phases checkpoint; a rerun resumes from there")
    parser.add_argument("--checkpoint-every", type=int, default=250, metavar="N",
                        help="checkpoint every N steps of each phase")
    parser.add_argument("--size", action="append", default=[], metavar="KEY=VALUE",
                        help="override a Sizes field, e.g. cogvideox_steps=30000 (repeatable)")
    args = parser.parse_args(argv)
    configure_logging()
    sizes = QUICK if args.quick else Sizes()
    try:
        sizes = override(sizes, args.size)
    except ValueError as err:
        parser.error(str(err))
    if args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    WORK.dir = None if args.quick else args.work.resolve()
    WORK.checkpoint_every = args.checkpoint_every
    manifest = build(Path(args.out), sizes, seed=args.seed, only=args.only)
    print(json.dumps(manifest["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
