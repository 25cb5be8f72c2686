"""Pretraining of the demo's own models: each objective trains what it says and nothing else."""

from __future__ import annotations

import pytest
import torch

from vidalign.data.synth import generate
from vidalign.errors import InvalidInput
from vidalign_trainer.pretrain import (
    Schedule,
    _apply,
    _dihedral_roll,
    cell_colours,
    instruction_tune,
    object_cells,
    position_labels_per_step,
    position_supervise,
    static_labels,
    static_pretrain,
    text_to_video,
    text_to_video_cogvideox,
    word_text_encoder,
)


@pytest.fixture(scope="module")
def clips():
    return generate(4, seed=11, frames=8, size=32)


def _videos(clips) -> torch.Tensor:
    return torch.stack([torch.from_numpy(c.video) for c in clips])


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_word_text_encoder_round_trips_through_the_loader(clips, tmp_path):
    from vidalign.vda import load_teacher

    teacher = load_teacher("tiny-animatediff")
    word_text_encoder(teacher, [c.caption for c in clips], 96)
    teacher.save_pretrained(tmp_path)
    again = load_teacher("tiny-animatediff", base=str(tmp_path))
    caption = clips[0].caption
    assert torch.equal(again.encode_text([caption]), teacher.encode_text([caption]))
    assert again.tokenizer.model_max_length == 96


def test_text_to_video_trains_unet_and_text_encoder_only(clips):
    from vidalign.vda import load_teacher

    teacher = load_teacher("tiny-animatediff")
    word_text_encoder(teacher, [c.caption for c in clips], 96)
    assert teacher.tokenizer.model_max_length == 96
    assert teacher.text_encoder.config.max_position_embeddings == 96
    ids = teacher.tokenizer("slides left")["input_ids"]
    assert teacher.tokenizer.convert_ids_to_tokens(ids) == ["slides", "left"]
    vae = _snapshot(teacher.vae)
    unet, text = _snapshot(teacher.unet), _snapshot(teacher.text_encoder)
    losses = text_to_video(teacher, _videos(clips), [c.caption for c in clips],
                           Schedule(steps=12, batch_size=4, lr=3e-3, log_every=100))
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    assert not _changed(vae, teacher.vae)
    assert _changed(unet, teacher.unet) and _changed(text, teacher.text_encoder)
    assert not any(p.requires_grad for p in teacher.parameters())  # frozen again


def test_text_to_video_is_deterministic(clips):
    from vidalign.vda import load_teacher

    runs = []
    for _ in range(2):
        teacher = load_teacher("tiny-animatediff")
        runs.append(text_to_video(teacher, _videos(clips[:2]), [c.caption for c in clips[:2]],
                                  Schedule(steps=2, batch_size=2, seed=5, log_every=100)))
    assert runs[0] == runs[1]


def test_text_to_video_cogvideox_trains_transformer_and_t5(clips):
    from vidalign.motionenhancer import load_cogvideox

    teacher = load_cogvideox("tiny-cogvideox")
    vae, transformer = _snapshot(teacher.vae), _snapshot(teacher.transformer)
    t5 = _snapshot(teacher.text_encoder)
    losses = text_to_video_cogvideox(teacher, _videos(clips), [c.caption for c in clips],
                                     Schedule(steps=12, batch_size=4, lr=3e-3, log_every=100))
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    assert not _changed(vae, teacher.vae) and _changed(transformer, teacher.transformer)
    # The text encoder trains too (its gradients reach it through encode_prompt(grad=True)).
    assert _changed(t5, teacher.text_encoder)
    assert not any(p.requires_grad for p in teacher.transformer.parameters())
    assert not any(p.requires_grad for p in teacher.text_encoder.parameters())
    # Outside training the prompt encoding stays without a graph.
    assert not teacher.encode_prompt("a red bar").embeds.requires_grad


def test_static_labels_by_hand(clips):
    labels = static_labels([c.truth for c in clips])
    truth = clips[0].truth
    assert labels["count"][0].item() == len(truth["objects"]) - 2
    assert set(labels["count"].tolist()) <= {0, 1, 2}
    assert labels["colors"][0].sum().item() == len({o["color"] for o in truth["objects"]})


def test_static_pretrain_then_instruction_tune(clips):
    from vidalign.students.videollm import load_videollm

    llm = load_videollm("tiny-videollava")
    videos = _videos(clips)
    before = _snapshot(llm.model)
    losses = static_pretrain(llm.encoder, videos, [c.truth for c in clips],
                             Schedule(steps=10, batch_size=4, lr=3e-3, log_every=100))
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    changed = _changed(before, llm.model)
    assert changed and all("video_tower" in k for k in changed)

    before = _snapshot(llm.model)
    examples = [(i, q.text, q.answer) for i, c in enumerate(clips) for q in c.questions]
    losses = instruction_tune(llm, videos, examples, Schedule(steps=10, batch_size=8, lr=3e-3,
                                                              log_every=100))
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    changed = _changed(before, llm.model)
    vision = {n for n, _ in llm.param_groups()["vision"]}  # empty: all frozen again
    assert not vision
    assert changed and not any("video_tower" in k for k in changed)
    assert any("multi_modal_projector" in k for k in changed)
    assert not llm.model.training and not any(p.requires_grad for p in llm.model.parameters())


def test_cell_colours_by_hand():
    from vidalign.data.synth import COLORS

    frame = torch.full((3, 16, 16), 0.5)  # grey
    red = torch.tensor(COLORS["red"]) / 255
    frame[:, 9:11, 4:6] = red.view(3, 1, 1)  # 4 pixels in cell (2, 1) of a 4 x 4 grid
    frame[:, 0, 0] = red  # 1 pixel in cell (0, 0): under min_pixels
    frame[:, 13:15, 13:15] = 0.9  # bright but grey: no colour
    cells = cell_colours(frame, 4, min_pixels=3)
    assert cells.shape == (16, len(COLORS))
    held = {(int(i), int(c)) for i, c in torch.nonzero(cells)}
    assert held == {(2 * 4 + 1, list(COLORS).index("red"))}
    with pytest.raises(InvalidInput, match="multiple of the grid"):
        cell_colours(frame, 3)


def test_object_cells_by_hand(clips):
    from vidalign.data.synth import COLORS, SHAPES
    from vidalign.probe import cell_index

    truth = clips[2].truth
    shape, color = object_cells([truth], [0, 5], grid=4)
    assert shape.shape == color.shape == (1, 2, 16)
    for j, f in enumerate((0, 5)):
        top = {}  # cell -> the object drawn last there (SynthMotion draws the first object last)
        for obj in reversed(truth["objects"]):
            top[cell_index(*obj["track"][f], size=truth["size"], grid=4)] = obj
        assert {int(k) for k in torch.nonzero(shape[0, j] >= 0)} == set(top)
        for cell, obj in top.items():
            assert shape[0, j, cell] == SHAPES.index(obj["shape"])
            assert color[0, j, cell] == list(COLORS).index(obj["color"])


def test_augmentation_moves_the_cell_labels_with_the_pixels(clips):
    """A roll by whole cells, flips and a transpose of the frames move each cell's content to the
    cell the same symmetry moves its labels to."""
    video = torch.from_numpy(clips[0].video).permute(0, 3, 1, 2).float() / 255  # (T, 3, 32, 32)
    before = cell_colours(video, 4)
    assert before.any()
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(12):
        op = _dihedral_roll(4, generator)
        seen.add(op[2:])
        moved = cell_colours(_apply(video, op, 8, (-2, -1)), 4)
        labels = _apply(before.unflatten(1, (4, 4)), op, 1, (1, 2)).flatten(1, 2)
        assert torch.equal(moved, labels), op
    assert len(seen) > 1  # the test drew more than one kind of symmetry


def test_static_pretrain_cells_train_the_grid_tower(clips):
    from vidalign.students import get_family
    from vidalign.students.videollm import load_videollm

    llm = load_videollm("tiny-videollava")
    with pytest.raises(InvalidInput, match="grid-pooled"):
        static_pretrain(llm.encoder, _videos(clips), [c.truth for c in clips],
                        Schedule(steps=1), cells=1.0)
    cells = get_family(llm.spec).encoder(llm.spec, llm.model, pooling="grid:4")
    with pytest.raises(InvalidInput, match="loss weight"):
        static_pretrain(cells, _videos(clips), [c.truth for c in clips], Schedule(steps=1), cells=-1)
    before = _snapshot(llm.model)
    losses = static_pretrain(cells, _videos(clips), [c.truth for c in clips],
                             Schedule(steps=12, batch_size=4, lr=3e-3, log_every=100),
                             cells=1.0, augment=True)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    changed = _changed(before, llm.model)
    assert changed and all("video_tower" in k for k in changed)


def test_position_labels_per_step_by_hand(clips):
    from vidalign.data.synth import COLORS
    from vidalign.probe import cell_index

    truth = clips[1].truth
    labels = position_labels_per_step([truth], [0, 5], grid=4)
    assert labels.shape == (1, 2, len(COLORS))
    present = {list(COLORS).index(o["color"]): o for o in truth["objects"]}
    for colour in range(len(COLORS)):
        if colour not in present:
            assert labels[0, :, colour].tolist() == [-1, -1]
            continue
        track = present[colour]["track"]
        assert labels[0, :, colour].tolist() == [
            cell_index(*track[f], size=truth["size"], grid=4) for f in (0, 5)]


def test_position_supervise_trains_the_tower_to_say_where_objects_are(clips):
    from vidalign.probe import encoder_features
    from vidalign.students.encoder import load_student

    videos = _videos(clips)
    encoder = load_student("tiny-videollava", pooling="grid:2")
    before = _snapshot(encoder)
    losses = position_supervise(encoder, videos, [c.truth for c in clips],
                                Schedule(steps=12, batch_size=4, lr=3e-3, log_every=100))
    # Four clips, a few objects each: the head and tower fit them within a dozen steps.
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert _changed(before, encoder) and not encoder.training
    assert encoder_features(encoder, videos).shape[-1] == 4 * encoder.d_v
    with pytest.raises(InvalidInput, match="grid"):
        position_supervise(load_student("tiny-videollava"), videos, [c.truth for c in clips],
                           Schedule(steps=1))
    with pytest.raises(InvalidInput, match="truths"):
        position_supervise(encoder, videos, [clips[0].truth], Schedule(steps=1))
