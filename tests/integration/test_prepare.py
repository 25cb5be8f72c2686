"""VDA data preparation: a representative subset, static captions offline or via an LLM endpoint."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys

import pytest

from tests.support.chat_server import ChatServer
from vidalign.data.benchmarks import load_openvid
from vidalign.data.prepare import (
    MOTION_WORDS,
    STATIC_SYSTEM_PROMPT,
    LLMRewriter,
    RuleBasedRewriter,
    ks_statistic,
    stratified_sample,
    subset_report,
)
from vidalign.store import open_store, read_artifact_file


def write_csv(path, n=400, seed=0):
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption", "aesthetic score", "motion score",
                         "temporal consistency score", "camera motion", "frame", "fps", "seconds"])
        for i in range(n):
            # Skewed columns: a naive head-of-file sample would be far off.
            writer.writerow([f"v{i:04d}.mp4", f"A red car on a street. It drives away quickly, then stops {i}.",
                             round(rng.gauss(5 + (i % 7) / 3, 0.5), 3), round(rng.expovariate(0.5), 3),
                             round(rng.uniform(0.9, 1.0), 4), "static", 120, 24, round(rng.uniform(2, 20), 2)])
    return path


def test_stratified_subset_keeps_the_statistics(tmp_path):
    items = load_openvid(write_csv(tmp_path / "src.csv")).items
    subset = stratified_sample(items, 60, seed=1)
    assert len(subset) == 60 and len({i.uid for i in subset}) == 60
    assert stratified_sample(items, 60, seed=1) == subset  # deterministic
    report = subset_report(items, subset)
    assert all(r["ks"] < 0.2 for r in report.values()), report
    # The check can fail: the first 60 rows are not representative of "seconds"-sorted data.
    biased = sorted(items, key=lambda i: i.seconds)[:60]
    assert subset_report(items, biased)["seconds"]["ks"] > 0.5


def test_ks_statistic():
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0
    assert ks_statistic([1, 2], [3, 4]) == 1
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5


@pytest.mark.parametrize("caption", [
    "A red car on a street. It drives away quickly, then stops.",
    "A woman in a blue dress walks along a beach while waves roll in.",
    "Two dogs run across a green field, chasing a ball.",
])
def test_rule_based_captions_have_no_motion(caption):
    static = RuleBasedRewriter().rewrite(caption)
    assert static and not MOTION_WORDS.search(static), static


def test_llm_rewriter_sends_vdas_prompt_and_caches(tmp_path):
    server = ChatServer(lambda body: "  A red car on a street.  ")
    try:
        cache = open_store(str(tmp_path / "cache"))
        rewriter = LLMRewriter(base_url=server.url, model="m", api_key="k", sleep=lambda s: None)
        rewriter.cache = cache
        server.script = [(500, "")]  # a transient failure, then an answer
        assert rewriter.rewrite("A red car drives.") == "A red car on a street."
        assert rewriter.rewrite("A red car drives.") == "A red car on a street."  # from the cache
        assert len(server.requests) == 2
        assert server.requests[-1]["body"]["messages"][0]["content"] == STATIC_SYSTEM_PROMPT
        assert "A red car drives." in server.requests[-1]["body"]["messages"][1]["content"]
    finally:
        server.close()


def test_cli_prepare_commits_the_subset(store_uri, tmp_path):
    source = write_csv(tmp_path / "src.csv", n=120)
    out = store_uri if store_uri.startswith("s3://") else f"file://{store_uri}"
    proc = subprocess.run([sys.executable, "-m", "vidalign_cli.main", "data", "prepare", "--csv", str(source),
                           "--n", "30", "--out", out], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_artifact_file(open_store(out), "subset", "subset.jsonl").decode().splitlines()
    assert len(rows) == 30
    assert all(not MOTION_WORDS.search(json.loads(r)["static_caption"]) for r in rows)
    report = json.loads(read_artifact_file(open_store(out), "subset", "report.json"))
    assert set(report) == {"aesthetic_score", "motion_score", "temporal_consistency_score", "seconds"}
