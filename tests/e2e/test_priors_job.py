"""`vidalign priors extract | show`: SynthMotion clips -> sharded priors in the
store (local and S3), resumable after a crash, over gRPC too; PNG rendering."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch

from vidalign.data.synth import SIDECAR_FILE, generate, read_sidecar, write_dataset
from vidalign.errors import NotFound
from vidalign.motionenhancer import extract_priors, load_cogvideox
from vidalign.motionenhancer.io import priors_from_bytes
from vidalign.store import open_store, read_manifest
from vidalign.teacher.client import LocalTeacher
from vidalign_teacher import priors as job

MODEL = "tiny-cogvideox"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_dataset(generate(3, seed=2, frames=9, size=32), root)
    return root


class Counting:
    """An in-process teacher that counts calls and can fail on a given call."""

    def __init__(self, teacher: LocalTeacher, fail_on: int | None = None) -> None:
        self.teacher, self.fail_on, self.calls = teacher, fail_on, 0

    def info(self):
        return self.teacher.info()

    def attention_priors(self, request):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("killed")
        return self.teacher.attention_priors(request)

    def close(self):
        pass


@pytest.fixture(scope="module")
def local_teacher() -> LocalTeacher:
    return LocalTeacher(MODEL)


def config(dataset, out, **overrides) -> job.ExtractConfig:
    fields = dict(data=str(dataset), out=out, shard_size=2, steps=2, device="cpu")
    fields.update(overrides)
    return job.ExtractConfig(**fields)


def test_extract_writes_sharded_priors(dataset, store_uri, local_teacher):
    teacher = Counting(local_teacher)
    uri = job.extract_dataset_priors(config(dataset, store_uri), teacher=teacher)
    assert teacher.calls == 3
    records = read_sidecar(dataset)
    priors_set = job.load_priors_set(uri)
    assert priors_set.ids == [r.clip_id for r in records]
    store = open_store(store_uri)
    assert read_manifest(store, "shard-00000").meta["clip_ids"] == priors_set.ids[:2]
    assert read_manifest(store, "shard-00001").meta["clip_ids"] == priors_set.ids[2:]
    assert sorted(store.list("shard-00000")) == sorted(
        f"shard-00000/{name}" for name in
        ["MANIFEST.json", f"{records[0].clip_id}.safetensors", f"{records[1].clip_id}.safetensors"]
    )
    cog = load_cogvideox(MODEL)
    for record in records:
        priors, prompt = priors_set.get(record.clip_id)
        assert prompt == record.caption  # the sidecar caption, not a question
        assert priors.metadata["clip_id"] == record.clip_id and priors.metadata["steps"] == 2
        video = job.load_frames(record.video_path, frames=9, height=32, width=32)
        want = extract_priors(cog, video, record.caption, steps=2)
        assert torch.equal(priors.prior, want.prior)
        assert priors.selected_heads == want.selected_heads
        assert priors.selected_tokens == want.selected_tokens


def test_killed_run_resumes_skipping_committed_shards(dataset, store_uri, local_teacher):
    crashing = Counting(local_teacher, fail_on=3)  # dies on shard 1, after shard 0 committed
    with pytest.raises(RuntimeError, match="killed"):
        job.extract_dataset_priors(config(dataset, store_uri), teacher=crashing)
    store = open_store(store_uri)
    first = read_manifest(store, "shard-00000")
    assert first is not None and read_manifest(store, "shard-00001") is None
    with pytest.raises(NotFound, match="no committed index"):
        job.load_priors_set(store_uri)

    resumed = Counting(local_teacher)
    job.extract_dataset_priors(config(dataset, store_uri), teacher=resumed)
    assert resumed.calls == 1  # only the missing shard's clip
    assert read_manifest(store, "shard-00000").created == first.created
    assert len(job.load_priors_set(store_uri).ids) == 3

    again = Counting(local_teacher)
    job.extract_dataset_priors(config(dataset, store_uri), teacher=again)
    assert again.calls == 0  # a finished set costs nothing

    changed = Counting(local_teacher)
    job.extract_dataset_priors(config(dataset, store_uri, steps=1), teacher=changed)
    assert changed.calls == 3  # other parameters: every shard is stale


def test_cli_over_grpc_teacher_matches_in_process(dataset, tmp_path):
    from vidalign_cli.main import main as cli
    from vidalign_teacher.server import ServerConfig, TeacherServer

    server = TeacherServer(ServerConfig(model=MODEL, host="127.0.0.1", port=0, device="cpu", workers=2))
    server.start()
    try:
        common = ["--data", str(dataset), "--shard-size", "2", "--steps", "2"]
        assert cli(["priors", "extract", *common, "--out", str(tmp_path / "grpc"),
                         "--teacher", f"127.0.0.1:{server.port}"]) == 0
        assert cli(["priors", "extract", *common, "--out", str(tmp_path / "local"), "--device", "cpu"]) == 0
        assert cli(["priors", "extract", *common, "--out", str(tmp_path / "x"), "--teacher-model", "cogvideox-5b",
                         "--teacher", f"127.0.0.1:{server.port}"]) == 2  # wrong pool: refused
    finally:
        server.stop(grace=0)
    remote, local = job.load_priors_set(str(tmp_path / "grpc")), job.load_priors_set(str(tmp_path / "local"))
    assert remote.ids == local.ids
    for clip_id in local.ids:
        (a, _), (b, _) = remote.get(clip_id), local.get(clip_id)
        assert torch.equal(a.prior, b.prior) and torch.equal(a.token_scores, b.token_scores)


def test_questions_are_the_prompts_without_a_sidecar(dataset, tmp_path):
    import shutil

    copy = tmp_path / "nosidecar"
    shutil.copytree(dataset, copy)
    (copy / SIDECAR_FILE).unlink()
    clips = job.dataset_clips(copy)
    meta = [json.loads(line) for line in (copy / "video_info.meta.jsonl").read_text().splitlines()]
    questions = [qa for line in meta for qa in line["qa"]]
    assert [c.clip_id for c in clips] == [qa["uid"] for qa in questions]
    assert clips[0].prompt == questions[0]["question"].split("\n")[0]
    with_sidecar = job.dataset_clips(dataset)
    assert [c.clip_id for c in with_sidecar] == [r.clip_id for r in read_sidecar(dataset)]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def test_show_writes_png_overlays_and_head_chart(dataset, tmp_path, local_teacher):
    from vidalign_cli.main import main as cli

    out = tmp_path / "priors"
    job.extract_dataset_priors(config(dataset, str(out)), teacher=Counting(local_teacher))
    clip_id = read_sidecar(dataset)[1].clip_id
    assert cli(["priors", "show", "--priors", str(out), "--clip", clip_id, "--out", str(tmp_path / "png"),
                     "--max-tokens", "4"]) == 0
    folder = tmp_path / "png" / clip_id
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["heads.png", "token-00.png", "token-01.png", "token-02.png", "token-03.png"]
    priors, _ = job.load_priors_set(str(out)).get(clip_id)
    f_tok = priors.prior.shape[1]
    # Panels: 32 px frames upscaled x4 to 128, 8 px padding, 28 px title, 18 px labels.
    assert png_size(folder / "token-00.png") == (8 + f_tok * (128 + 8), 28 + 128 + 18 + 8)
    width, height = png_size(folder / "heads.png")
    assert width >= 320 and height == 32 + 200 + 28

    from PIL import Image

    with Image.open(folder / "token-00.png") as image:  # the overlay is not blank
        assert len(set(image.convert("RGB").getdata())) > 50

    # One priors file on its own (no store index) renders too.
    single = tmp_path / "one.safetensors"
    shard = job.load_priors_set(str(out)).clips[0]
    single.write_bytes((out / shard["shard"] / f"{shard['key']}.safetensors").read_bytes())
    # The file is the first clip's: count its own tokens (the clips' captions differ in length).
    first, _ = priors_from_bytes(single.read_bytes())
    paths = job.show(str(single), tmp_path / "png1")
    assert len(paths) == len(first.selected_tokens) + 1 and all(png_size(p) for p in paths)
