"""`vidalign data synth` then `vidalign eval`: the oracle scores 100%, results land in the store."""

from __future__ import annotations

import json
import subprocess
import sys

from vidalign.store import list_artifacts, open_store, read_artifact_file


def vidalign(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vidalign_cli.main", *args],
                          capture_output=True, text=True, timeout=300)


def test_synth_then_eval_into_the_store(store_uri, tmp_path):
    data = tmp_path / "synth"
    made = vidalign("data", "synth", "--n", "3", "--out", str(data), "--seed", "4")
    assert made.returncode == 0, made.stderr[-2000:]
    out = store_uri if store_uri.startswith("s3://") else f"file://{store_uri}"
    oracle = vidalign("eval", "--bench", "motionbench", "--data", str(data), "--answerer", "oracle",
                      "--out", out, "--name", "oracle")
    assert oracle.returncode == 0, oracle.stderr[-2000:]
    result = json.loads(oracle.stdout.strip().splitlines()[-1])
    assert result["overall"] == 1.0 and result["n"] == 3 * 6
    store = open_store(out)
    assert list_artifacts(store) == ["oracle"]
    stored = json.loads(read_artifact_file(store, "oracle", "oracle.json"))
    assert stored["overall"] == 1.0


def test_eval_of_a_missing_dataset_is_a_clear_error(tmp_path):
    proc = vidalign("eval", "--bench", "motionbench", "--data", str(tmp_path / "nope"),
                    "--answerer", "first-option")
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_eval_of_a_student_by_likelihood_and_with_other_videos(tmp_path):
    """--likelihood and --substitute: both rules, per category, with the clip's own and
    another clip's video; the JSON carries them and the table prints them."""
    data = tmp_path / "synth"
    assert vidalign("data", "synth", "--n", "3", "--out", str(data), "--seed", "4").returncode == 0
    out = tmp_path / "out"
    proc = vidalign("eval", "--bench", "motionbench", "--data", str(data), "--student",
                    "tiny-videollava", "--likelihood", "--substitute", "--frames", "4",
                    "--max-new-tokens", "2", "--out", str(out), "--name", "tiny")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n"] == 3 * 6
    assert result["likelihood"]["n"] == 3 * 6 and 0.0 <= result["likelihood"]["overall"] <= 1.0
    assert result["substitution"] is not None
    # The side-by-side table: both rules, with the own and another clip's video.
    assert ("| category | n | letter | likelihood | letter, other video | likelihood, other video |"
            in proc.stdout)
    assert (out / "tiny.substituted.jsonl").is_file()


def test_eval_likelihood_and_substitute_need_something_to_ask(tmp_path):
    likelihood = vidalign("eval", "--bench", "motionbench", "--data", str(tmp_path),
                          "--answerer", "oracle", "--likelihood")
    assert likelihood.returncode == 2
    assert "--likelihood goes into a --student VideoLLM" in likelihood.stderr
    saved = vidalign("eval", "--bench", "motionbench", "--data", str(tmp_path),
                     "--predictions", "p.jsonl", "--substitute")
    assert saved.returncode == 2 and "--substitute asks the questions again" in saved.stderr
