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
character-level tokenizer is built on the fly with the ``tokenizers`` library
(a BPE model with no merges over printable ASCII, ``Fuse`` decoder), wrapped
in ``PreTrainedTokenizerFast``, its special tokens given the ids the tiny
config reserves (``<video>`` = 127, ...), and a Jinja chat template in the
real model's format set on it. Real checkpoints use ``AutoProcessor``'s
tokenizer and chat template (untested here: needs the download).

Families (``_families``): Video-LLaVA, LLaVA-NeXT-Video (``pixel_values_videos``,
``<video>`` x T x tokens per frame), Qwen2.5-VL (Qwen's flattened video patches
+ ``video_grid_thw``, ``<|vision_start|><|video_pad|> x n<|vision_end|>``) and
InternVL3 (frames as images: ``pixel_values`` (B*T, 3, S, S) and
``Frame{i}: <img><IMG_CONTEXT> x k</img>`` per frame, as its processor writes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vidalign.errors import InvalidInput, NotFound
from vidalign.students.encoder import VideoEncoder, VideoLlavaEncoder, build_tiny_video_llava
from vidalign.students.registry import StudentSpec, get_student_spec

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt, video, padding)."""

VIDEO_LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}USER: {% else -%}ASSISTANT: {% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'video' -%}{{ '<video>\\n' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'user' %} {% else -%}{{ eos_token }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT: {% endif -%}"
)
"""Video-LLaVA's conversation format, ``USER: <video>\\n{prompt} ASSISTANT: {reply}</s>``."""


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
"""ChatML (Qwen2.5-VL, InternVL3); ``VIDEO``/``IMAGE`` are replaced by the family's placeholders.
The real templates also add a default system message; the tiny ones leave it out."""


@dataclass(frozen=True, kw_only=True)
class _Family:
    """How one family's model is built and takes a video."""

    model_class: str
    """transformers class of the whole VideoLLM."""
    build_tiny: Callable[[int], nn.Module]
    tiny_specials: dict[str, int]
    """Special tokens of the tiny tokenizer and their ids in the tiny config."""
    tiny_eos: str
    chat_template: str
    """Tiny chat template (real checkpoints bring their own)."""
    placeholder: str
    """The video placeholder the chat template writes (expanded per video)."""
    video_token: str
    """The token the model fills with video features."""
    encoder: Callable[[StudentSpec, nn.Module], VideoEncoder]
    """The family's VideoEncoder on the model's own tower."""
    inputs: Callable[[VideoEncoder, Any, Tensor], tuple[dict[str, Tensor], str]]
    """(encoder, model config, pixels) -> model kwargs and the placeholder's expansion."""


def _video_llava_inputs(encoder: Any, config: Any, pixels: Tensor) -> tuple[dict[str, Tensor], str]:
    # The video path keeps CLS: T x (patches + 1) tokens.
    n = pixels.shape[1] * (encoder.patch_grid**2 + 1)
    return {"pixel_values_videos": pixels}, "<video>" * n


def _llava_next_video_inputs(
    encoder: Any, config: Any, pixels: Tensor
) -> tuple[dict[str, Tensor], str]:
    # CLS dropped, then the stride-s average-pool resampler: T x (grid // s)^2 tokens.
    n = pixels.shape[1] * (encoder.patch_grid // config.spatial_pool_stride) ** 2
    return {"pixel_values_videos": pixels}, "<video>" * n


def _qwen_inputs(encoder: Any, config: Any, pixels: Tensor) -> tuple[dict[str, Tensor], str]:
    patches, grid_thw = encoder.patchify(pixels)
    n = int(grid_thw[0].prod()) // encoder.merge**2
    return {"pixel_values_videos": patches, "video_grid_thw": grid_thw}, "<|video_pad|>" * n


def _internvl_inputs(encoder: Any, config: Any, pixels: Tensor) -> tuple[dict[str, Tensor], str]:
    # Frames as images, each "Frame{i}: <img><IMG_CONTEXT> x k</img>\n" as InternVL's processor writes it.
    k = int(encoder.patch_grid * config.downsample_ratio) ** 2
    frames = "".join(
        f"Frame{i + 1}: <img>{'<IMG_CONTEXT>' * k}</img>\n" for i in range(pixels.shape[1])
    )
    return {"pixel_values": pixels.flatten(0, 1)}, frames


def _tower_view(make: Callable[[nn.Module], VideoEncoder], tower: nn.Module) -> VideoEncoder:
    """``make(tower)``, leaving the tower's ``requires_grad`` flags as they were."""
    flags = [p.requires_grad for p in tower.parameters()]
    encoder = make(tower)
    for p, flag in zip(tower.parameters(), flags, strict=True):
        p.requires_grad_(flag)
    return encoder


def _families() -> dict[str, _Family]:
    from vidalign.students import families as f

    llava_specials = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 126, "<video>": 127}
    chatml = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<|im_start|>": 120, "<|im_end|>": 121}
    return {
        "video-llava": _Family(
            model_class="VideoLlavaForConditionalGeneration",
            build_tiny=build_tiny_video_llava,
            tiny_specials=llava_specials,
            tiny_eos="</s>",
            chat_template=VIDEO_LLAVA_CHAT_TEMPLATE,
            placeholder="<video>",
            video_token="<video>",
            encoder=lambda spec, model: _tower_view(
                lambda t: VideoLlavaEncoder(
                    spec=spec, tower=t, config=model.config, pooling="frame"
                ),
                model.model.video_tower,
            ),
            inputs=_video_llava_inputs,
        ),
        "llava-next-video": _Family(
            model_class="LlavaNextVideoForConditionalGeneration",
            build_tiny=f.build_tiny_llava_next_video,
            tiny_specials=llava_specials,
            tiny_eos="</s>",
            chat_template=VIDEO_LLAVA_CHAT_TEMPLATE,
            placeholder="<video>",
            video_token="<video>",
            encoder=lambda spec, model: _tower_view(
                lambda t: f.LlavaNextVideoEncoder(
                    spec=spec, tower=t, config=model.config, pooling="frame"
                ),
                model.model.vision_tower,
            ),
            inputs=_llava_next_video_inputs,
        ),
        "qwen2.5-vl": _Family(
            model_class="Qwen2_5_VLForConditionalGeneration",
            build_tiny=f.build_tiny_qwen2_5_vl,
            tiny_specials={
                **chatml,
                "<|vision_start|>": 123,
                "<|vision_end|>": 124,
                "<|image_pad|>": 125,
                "<|video_pad|>": 126,
            },
            tiny_eos="<|im_end|>",
            chat_template=CHATML_CHAT_TEMPLATE.replace(
                "{{ VIDEO }}", "<|vision_start|><|video_pad|><|vision_end|>"
            ).replace("{{ IMAGE }}", "<|vision_start|><|image_pad|><|vision_end|>"),
            placeholder="<|video_pad|>",
            video_token="<|video_pad|>",
            encoder=lambda spec, model: _tower_view(
                lambda t: f.Qwen25VLEncoder(
                    spec=spec,
                    tower=t,
                    config=model.config,
                    pooling="frame",
                    image_size=f.TINY_QWEN_IMAGE_SIZE if spec.tiny else f.QWEN_IMAGE_SIZE,
                ),
                model.model.visual,
            ),
            inputs=_qwen_inputs,
        ),
        "internvl": _Family(
            model_class="InternVLForConditionalGeneration",
            build_tiny=f.build_tiny_internvl,
            tiny_specials={**chatml, "<img>": 118, "</img>": 119, "<IMG_CONTEXT>": 127},
            tiny_eos="<|im_end|>",
            chat_template=CHATML_CHAT_TEMPLATE.replace("{{ VIDEO }}", "{{ '<video>\\n' }}").replace(
                "{{ IMAGE }}", "{{ '<image>\\n' }}"
            ),
            placeholder="<video>",
            video_token="<IMG_CONTEXT>",
            encoder=lambda spec, model: _tower_view(
                lambda t: f.InternVLEncoder(
                    spec=spec, tower=t, config=model.config, pooling="frame"
                ),
                model.model.vision_tower,
            ),
            inputs=_internvl_inputs,
        ),
    }


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
        self.family = _family(spec)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.family.video_token)
        if self.video_token_id is None or self.video_token_id == tokenizer.unk_token_id:
            raise InvalidInput(
                f"tokenizer of {spec.name!r} has no {self.family.video_token!r} token"
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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


def _family(spec: StudentSpec) -> _Family:
    known = _families()
    if spec.family not in known:
        raise NotFound(
            f"student family {spec.family!r} of {spec.name!r} has no VideoLLM wrapper; known: {sorted(known)}"
        )
    return known[spec.family]


def tiny_tokenizer(name: str) -> Any:
    """The character-level tokenizer + chat template of the tiny student ``name``."""
    family = _family(get_student_spec(name))
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
    family = _family(spec)
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
