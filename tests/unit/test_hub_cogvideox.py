"""`vidalign models list` / `models pull` for MotionEnhancer's CogVideoX (vidalign.hub).

The priors Job stages CogVideoX like the other models: the weights Job pulls it
into the store (`pull NAME --out s3://...`), and the priors pod copies it to a
local directory (`pull NAME --from s3://... --out DIR`) that `priors extract
--teacher-model DIR` loads.
"""

from __future__ import annotations

import pytest
import torch

from vidalign.errors import InvalidInput, NotFound
from vidalign.hub import pull, weight_sources
from vidalign.motionenhancer import COGVIDEOX_MODELS, load_cogvideox
from vidalign.store import list_artifacts, open_store, read_manifest
from vidalign.teacher.priors import is_cogvideox
from vidalign_cli.main import main


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A CogVideoX pipeline folder in the layout of the hub repos (tiny weights)."""
    root = tmp_path_factory.mktemp("cogvideox-src")
    load_cogvideox("tiny-cogvideox").save_pretrained(root / "pipeline")
    (root / "pipeline" / ".cache").mkdir()
    (root / "pipeline" / ".cache" / "lock").write_text("hub download state: never staged\n")
    return root


def test_every_cogvideox_with_weights_has_one_pipeline_component():
    for name, spec in COGVIDEOX_MODELS.items():
        if spec.repo is None:
            with pytest.raises(InvalidInput, match="random-init preset"):
                weight_sources(name)
        else:
            assert weight_sources(name) == {"pipeline": spec.repo}, name
    assert weight_sources("cogvideox1.5-5b") == {"pipeline": "THUDM/CogVideoX1.5-5B"}
    with pytest.raises(NotFound, match=r"cogvideox1\.5-5b"):  # the error names the known models
        weight_sources("no-such-model")


def test_models_list_shows_the_cogvideox_teachers(capsys):
    assert main(["models", "list"]) == 0
    teachers = capsys.readouterr().out.split("students (")[0]
    listed = {line.split()[0]: line.split()[1] for line in teachers.splitlines() if line.startswith("  ")}
    for name in COGVIDEOX_MODELS:
        assert listed[name] == "cogvideox", name


def test_pull_stages_the_pipeline_and_a_local_copy_loads(pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VIDALIGN_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "store" / "models" / "cogvideox1.5-5b"
    staged = pull("cogvideox1.5-5b", str(store), source_dir=str(pipeline_dir))
    assert staged == {"pipeline": f"{store}/pipeline"}
    assert list_artifacts(open_store(str(store))) == ["pipeline"]
    manifest = read_manifest(open_store(str(store)), "pipeline")
    assert manifest.meta == {"model": "cogvideox1.5-5b", "component": "pipeline",
                             "source": str(pipeline_dir)}
    assert "transformer/config.json" in manifest.files
    assert not any(part.startswith(".") for rel in manifest.files for part in rel.split("/"))

    # What the priors pod does: a verified local copy from the store, loaded as a directory.
    local = tmp_path / "weights" / "cogvideox1.5-5b"
    assert pull("cogvideox1.5-5b", str(local), source_dir=f"file://{store}") == {
        "pipeline": f"{local}/pipeline"
    }
    assert read_manifest(open_store(str(local)), "pipeline").files == manifest.files
    assert is_cogvideox(str(local / "pipeline"))
    copy, reference = load_cogvideox(str(local / "pipeline")), load_cogvideox("tiny-cogvideox")
    for (key, value), (ref_key, ref_value) in zip(
        copy.transformer.state_dict().items(), reference.transformer.state_dict().items(), strict=True
    ):
        assert key == ref_key and torch.equal(value, ref_value), key


def test_pull_from_a_store_without_the_component_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDALIGN_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotFound, match=r"no staged pipeline of cogvideox1\.5-5b"):
        pull("cogvideox1.5-5b", str(tmp_path / "out"), source_dir=f"file://{empty}")


def test_models_pull_command(pipeline_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VIDALIGN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "store" / "cogvideox1.5-5b"
    assert main(["models", "pull", "cogvideox1.5-5b", "--from", str(pipeline_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"pipeline: {out}/pipeline"
    assert main(["models", "pull", "tiny-cogvideox", "--out", str(tmp_path / "x")]) == 2
    assert "random-init preset" in capsys.readouterr().err
