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
