"""A whole student VideoLLM for VDA's stage 3 and for evaluation.

    llm = load_videollm("tiny-videollava")
    llm.loss(videos, prompts, targets)           # CE on the target tokens only
    llm.generate(videos, prompts, max_new_tokens=16)   # batched, greedy -> list[str]

:class:`VideoLLM` holds the model, its tokenizer and chat template, and the
student's :class:`~vidalign.students.VideoEncoder` built *on the model's own
tower* (the same module, not a copy): ``preprocess`` gives the pixels the
model sees, and a stage-2 encoder state dict (``encoder.safetensors``, keys
``tower.*``) loads into the model with :meth:`VideoLLM.load_encoder_state`.

Inputs. A prompt becomes the chat ``[{"role": "user", "content": [{"type":
"video"}, {"type": "text", "text": prompt}]}]`` rendered by the model's own
chat template; the template's video placeholder is then expanded to as many
video tokens as the tower gives features (the model checks the count). A
target is rendered as the assistant's reply: the ids are
``tokenize(prompt_text) + tokenize(full_text[len(prompt_text):])`` (so the
reply carries the template's end-of-turn token), and labels are -100 on the
prompt part and on padding. Loss batches pad on the right, generation batches
on the left.

Tiny presets need a tokenizer with a chat template and no download: a
character-level one is built on the fly (``vidalign.students.tokenizer``) with
the family's special tokens and a chat template in the real model's format.
Real checkpoints use ``AutoProcessor``'s tokenizer and chat template
(untested here: needs the download).

Everything family-specific (model class, chat template, placeholder, the
pixels and placeholder expansion of a video, the encoder on the model's
tower, parameter groups) comes from the spec's registered
:class:`~vidalign.students.StudentFamily` (``VideoLLM.family``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vidalign.errors import InvalidInput
from vidalign.students.encoder import VideoEncoder
from vidalign.students.family import ParamGroups, StudentSpec, get_family, get_student_spec
from vidalign.students.tokenizer import build_char_tokenizer, build_word_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "VideoLLM",
    "build_char_tokenizer",  # re-exported: defined in vidalign.students.tokenizer
    "build_word_tokenizer",  # re-exported: defined in vidalign.students.tokenizer
    "load_videollm",
    "tiny_tokenizer",
]

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt, video, padding)."""


class VideoLLM:
    """A student VideoLLM with its tokenizer, chat template and encoder view.

    ``model`` may be replaced by a wrapper with the same call signature (a
    ``peft.PeftModel``); ``encoder`` keeps pointing at the tower inside it.
    """

    def __init__(
        self, *, spec: StudentSpec, model: nn.Module, tokenizer: Any, encoder: VideoEncoder
    ) -> None:
        if tokenizer.chat_template is None:
            raise InvalidInput(f"tokenizer of {spec.name!r} has no chat template")
        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.family = get_family(spec)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.family.video_token)
        if self.video_token_id is None or self.video_token_id == tokenizer.unk_token_id:
            raise InvalidInput(
                f"tokenizer of {spec.name!r} has no {self.family.video_token!r} token"
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def param_groups(self) -> ParamGroups:
        """Trainable parameters of ``model`` by group (``"vision"``, ``"projector"``, ``"llm"``),
        as the family names its modules; see :meth:`StudentFamily.param_groups`."""
        return self.family.param_groups(self.model)

    # -- weights ------------------------------------------------------------------------

    def load_encoder_state(self, state: Mapping[str, Tensor]) -> None:
        """Load a stage-2 ``VideoEncoder`` state dict (keys ``tower.*``) into the model's tower."""
        missing, unexpected = self.encoder.load_state_dict(dict(state), strict=False)
        if missing or unexpected:
            raise InvalidInput(
                f"encoder weights do not fit {self.spec.name!r}: missing {sorted(missing)[:5]} "
                f"({len(missing)}), unexpected {sorted(unexpected)[:5]} ({len(unexpected)})"
            )

    # -- inputs -------------------------------------------------------------------------

    def _video_inputs(self, videos: Tensor) -> tuple[dict[str, Tensor], str]:
        """uint8 videos -> model kwargs and the text that replaces one video placeholder."""
        pixels = self.encoder.preprocess(videos.to(self.device))
        pixels = pixels.to(next(self.model.parameters()).dtype)
        return self.family.inputs(self.encoder, self.config, pixels)

    @property
    def config(self) -> Any:
        """The VideoLLM's config (through a peft wrapper too)."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return model.config

    def _render(self, prompt: str, target: str | None) -> tuple[str, str]:
        """(prompt text ending in the generation prompt, reply text or "")."""
        user = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}
        head = self.tokenizer.apply_chat_template(
            [user], tokenize=False, add_generation_prompt=True
        )
        if target is None:
            return head, ""
        reply = {"role": "assistant", "content": [{"type": "text", "text": target}]}
        full = self.tokenizer.apply_chat_template([user, reply], tokenize=False)
        if not full.startswith(head):
            raise InvalidInput(
                f"chat template of {self.spec.name!r}: the conversation does not start with the "
                f"generation prompt ({head[-40:]!r}), so the reply cannot be told apart"
            )
        return head, full[len(head) :]

    def _ids(self, text: str, video_text: str) -> list[int]:
        if text.count(self.family.placeholder) != 1:
            raise InvalidInput(
                f"prompt: expected one video placeholder {self.family.placeholder!r} after the chat "
                f"template, found {text.count(self.family.placeholder)}"
            )
        text = text.replace(self.family.placeholder, video_text)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def build_inputs(
        self,
        videos: Tensor,
        prompts: Sequence[str],
        targets: Sequence[str] | None = None,
        *,
        padding_side: str = "right",
    ) -> dict[str, Tensor]:
        """Model kwargs: ``input_ids``, ``attention_mask``, the pixels and (with targets) ``labels``."""
        if len(prompts) != videos.shape[0] or (
            targets is not None and len(targets) != len(prompts)
        ):
            raise InvalidInput(
                f"expected one prompt (and target) per video: {videos.shape[0]} videos, "
                f"{len(prompts)} prompts, {len(targets) if targets is not None else 'no'} targets"
            )
        pixel_kwargs, video_text = self._video_inputs(videos)
        rows: list[tuple[list[int], list[int]]] = []
        for i, prompt in enumerate(prompts):
            head, reply = self._render(prompt, None if targets is None else targets[i])
            head_ids = self._ids(head, video_text)
            reply_ids = (
                self.tokenizer(reply, add_special_tokens=False)["input_ids"] if reply else []
            )
            rows.append((head_ids + reply_ids, [IGNORE_INDEX] * len(head_ids) + reply_ids))
        length = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            span = (
                slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
            )
            input_ids[i, span] = torch.tensor(ids)
            labels[i, span] = torch.tensor(lab)
            mask[i, span] = 1
        out = {"input_ids": input_ids, "attention_mask": mask}
        if targets is not None:
            out["labels"] = labels
        out = {k: v.to(self.device) for k, v in out.items()}
        out.update(pixel_kwargs)
        return out

    # -- stage 3 and evaluation --------------------------------------------------------

    def logits(self, videos: Tensor, prompts: Sequence[str], targets: Sequence[str]) -> Tensor:
        """Logits of the teacher-forced conversations (right-padded)."""
        inputs = self.build_inputs(videos, prompts, targets)
        inputs.pop("labels")
        return self.model(**inputs).logits

    def loss(self, videos: Tensor, prompts: Sequence[str], targets: Sequence[str]) -> Tensor:
        """Mean next-token cross-entropy over the target tokens of the batch."""
        inputs = self.build_inputs(videos, prompts, targets)
        return self.model(**inputs).loss

    @torch.no_grad()
    def generate(
        self, videos: Tensor, prompts: Sequence[str], max_new_tokens: int = 32
    ) -> list[str]:
        """Greedy replies, one per (video, prompt), special tokens removed."""
        inputs = self.build_inputs(videos, prompts, padding_side="left")
        out = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


# --------------------------------------------------------------------------------------------
# Loading


def tiny_tokenizer(name: str) -> Any:
    """The character-level tokenizer + chat template of the tiny student ``name``."""
    family = get_family(get_student_spec(name))
    return build_char_tokenizer(
        family.tiny_specials,
        vocab_size=128,
        chat_template=family.chat_template,
        eos=family.tiny_eos,
    )


def load_videollm(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | None = None,
    seed: int = 0,
) -> VideoLLM:
    """The registered student ``name`` as a whole VideoLLM, in eval mode.

    Tiny presets are built (weights fixed by ``seed``) with an on-the-fly
    tokenizer unless ``path`` is given; otherwise the model, tokenizer and chat
    template come from ``path`` or the spec's ``hf_id`` (the full download).
    """
    spec = get_student_spec(name)
    family = get_family(spec)
    if path is None and spec.tiny:
        model = family.build_tiny(seed)
        tokenizer = tiny_tokenizer(name)
    else:
        import transformers

        source = path if path is not None else spec.hf_id
        if source is None:
            raise InvalidInput(
                f"path: student {name!r} has no hf_id, so a checkpoint path is required"
            )
        model_class = getattr(transformers, family.model_class)
        model = model_class.from_pretrained(source, dtype=dtype).eval()
        try:
            processor = transformers.AutoProcessor.from_pretrained(source)
            tokenizer = processor.tokenizer
            tokenizer.chat_template = processor.chat_template or tokenizer.chat_template
        except (OSError, ValueError, TypeError):  # a bare save_pretrained dir: tokenizer only
            tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    model = model.to(device=device, dtype=dtype)
    return VideoLLM(
        spec=spec, model=model, tokenizer=tokenizer, encoder=family.encoder(spec, model)
    )
