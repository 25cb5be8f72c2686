"""VDA's data preparation: a training subset that keeps the source's statistics, static captions.

VDA trains on 10,000 OpenVid-1M clips "sampled to preserve the set's
statistics" and conditions the teacher on captions rewritten to describe only
the static scene (table 4's prompt). Here:

- ``stratified_sample``: strata are the joint quantile bins of the score and
  duration columns; each stratum gets its share of the subset (largest
  remainder), drawn deterministically from the seed. ``subset_report`` gives,
  per column, the two-sample Kolmogorov-Smirnov statistic between subset and
  source, so a user can see that the subset is representative.
- Caption rewriting: ``LLMRewriter`` sends VDA's prompt to an OpenAI-compatible
  endpoint (``VIDALIGN_REWRITER_{BASE_URL,MODEL,API_KEY}``) and caches each
  answer in the store, keyed by the caption, so a rerun costs nothing;
  ``RuleBasedRewriter`` (the offline default) drops motion clauses and words.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tqdm import tqdm

from vidalign.data.benchmarks.records import CaptionItem
from vidalign.errors import InvalidInput, NotFound
from vidalign.llm import ChatClient
from vidalign.store import Store

STRATA_COLUMNS = ("aesthetic_score", "motion_score", "temporal_consistency_score", "seconds")

# VDA, appendix A, table 4.
STATIC_SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed to rephrase and summarize input text. Your task is "
    "to condense a given paragraph describing a video into one or two sentences, preserving its "
    "spatial key information."
)
STATIC_USER_PROMPT = "Please summarize the following video explanation into one or two sentences:\n\n{caption}"
PROMPT_VERSION = "vda-table4-v1"


# --- sampling -----------------------------------------------------------------------


def _edges(values: Sequence[float], bins: int) -> list[float]:
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, (len(ordered) * k) // bins)] for k in range(1, bins)]


def stratified_sample(
    items: Sequence[CaptionItem],
    n: int,
    *,
    columns: Sequence[str] = STRATA_COLUMNS,
    bins: int = 4,
    seed: int = 0,
) -> list[CaptionItem]:
    """``n`` items whose joint distribution over ``columns`` follows the source's."""
    if not 0 < n <= len(items):
        raise InvalidInput(f"n: expected 1..{len(items)} (the source's size), got {n}")
    edges = {}
    for column in columns:
        values = [getattr(i, column) for i in items if getattr(i, column) is not None]
        edges[column] = _edges(values, bins) if values else []
    strata: dict[tuple, list[CaptionItem]] = defaultdict(list)
    for item in sorted(items, key=lambda i: i.uid):
        key = tuple(
            -1 if getattr(item, c) is None else bisect.bisect_right(edges[c], getattr(item, c))
            for c in columns
        )
        strata[key].append(item)
    # Largest-remainder allocation: shares sum to n exactly.
    total = len(items)
    shares = {k: n * len(v) / total for k, v in strata.items()}
    counts = {k: int(s) for k, s in shares.items()}
    for key in sorted(shares, key=lambda k: (counts[k] - shares[k], k))[: n - sum(counts.values())]:
        counts[key] += 1
    rng = random.Random(seed)
    picked = []
    for key in sorted(strata):
        picked.extend(rng.sample(strata[key], counts[key]))
    return sorted(picked, key=lambda i: i.uid)


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov D: the largest gap between the empirical CDFs."""
    if not a or not b:
        return float("nan")
    xs, ys = sorted(a), sorted(b)
    gap = 0.0
    for value in sorted(set(xs) | set(ys)):
        fa = bisect.bisect_right(xs, value) / len(xs)
        fb = bisect.bisect_right(ys, value) / len(ys)
        gap = max(gap, abs(fa - fb))
    return gap


def subset_report(
    source: Sequence[CaptionItem], subset: Sequence[CaptionItem], columns: Sequence[str] = STRATA_COLUMNS
) -> dict[str, dict[str, float]]:
    report = {}
    for column in columns:
        a = [getattr(i, column) for i in source if getattr(i, column) is not None]
        b = [getattr(i, column) for i in subset if getattr(i, column) is not None]
        report[column] = {
            "ks": round(ks_statistic(a, b), 4),
            "source_mean": round(sum(a) / len(a), 4) if a else float("nan"),
            "subset_mean": round(sum(b) / len(b), 4) if b else float("nan"),
        }
    return report


# --- static captions -------------------------------------------------------------------


class Rewriter(Protocol):
    name: str

    def rewrite(self, caption: str) -> str: ...


# Verbs and words that describe how things move or change; a clause holding one is motion.
MOTION_WORDS = re.compile(
    r"\b(mov\w*|walk\w*|run\w*|ran|jump\w*|turn\w*|rotat\w*|spin\w*|fly\w*|flies|flew|roll\w*|"
    r"bounc\w*|slid\w*|pan\w*|zoom\w*|swim\w*|danc\w*|fall\w*|fell|ris\w*|rose|driv\w*|drove|"
    r"approach\w*|leav\w*|enter\w*|exit\w*|climb\w*|wav\w*|shak\w*|travel\w*|cross\w*|follow\w*|"
    r"chas\w*|pass\w*|head\w*|toward\w*|away|then|while|gradually|slowly|quickly|suddenly|"
    r"begins?|starts?|stops?|continu\w*|motion|speed\w*|accelerat\w*)\b",
    re.IGNORECASE,
)


@dataclass
class RuleBasedRewriter:
    """Offline default: keep the sentences and clauses that describe the scene, not the action."""

    name: str = "rule-based"
    max_sentences: int = 2

    def rewrite(self, caption: str) -> str:
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", caption.strip()) if s.strip()]
        kept: list[str] = []
        for sentence in sentences:
            clauses = [c.strip() for c in re.split(r",|;|\band\b|\bas\b|\bwhile\b", sentence)]
            static = [c for c in clauses if c and not MOTION_WORDS.search(c)]
            if static:
                kept.append(", ".join(static).rstrip(".!?") + ".")
            if len(kept) == self.max_sentences:
                break
        if kept:
            return " ".join(kept)
        # Every clause moves: keep what precedes the first motion word (usually the subject).
        head = MOTION_WORDS.split(sentences[0] if sentences else caption, maxsplit=1)[0]
        return (head.strip(" ,;") or "A video") + "."


class LLMRewriter(ChatClient):
    """VDA's table-4 prompt on a chat-completions endpoint, answers cached in a store."""

    name = "llm"
    cache: Store | None = None

    @classmethod
    def from_env(cls, cache: Store | None = None, **overrides) -> LLMRewriter:
        rewriter = cls(**cls.env_values("VIDALIGN_REWRITER"), **overrides)
        rewriter.cache = cache
        return rewriter

    def _key(self, caption: str) -> str:
        digest = hashlib.sha256(f"{PROMPT_VERSION}\0{self.model}\0{caption}".encode()).hexdigest()
        return f"{digest}.txt"

    def rewrite(self, caption: str) -> str:
        if self.cache is not None:
            try:
                return self.cache.get_bytes(self._key(caption)).decode()
            except NotFound:
                pass
        messages = [
            {"role": "system", "content": STATIC_SYSTEM_PROMPT},
            {"role": "user", "content": STATIC_USER_PROMPT.format(caption=caption)},
        ]
        answer = self.ask(messages, _parse_summary, "caption rewriter")
        if self.cache is not None:
            self.cache.put_bytes(self._key(caption), answer.encode())
        return answer


def _parse_summary(reply: str) -> str:
    text = " ".join(reply.split())
    if not text:
        raise InvalidInput("the rewriter answered with nothing")
    return text


def rewrite_all(items: Sequence[CaptionItem], rewriter: Rewriter, *, progress: bool = True) -> list[str]:
    return [rewriter.rewrite(i.caption) for i in tqdm(items, desc="static captions", disable=not progress)]


def subset_records(
    items: Sequence[CaptionItem], static: Sequence[str], video_root: str = ""
) -> bytes:
    """The subset as JSON lines (``data.kind: records``): what every VDA stage reads.

    ``video`` is the file's path, or ``<video_root>/<name>`` when the videos
    live in a store (``video_root`` a store URI).
    """
    lines = []
    for item, caption in zip(items, static, strict=True):
        lines.append(json.dumps({
            "uid": item.uid,
            "video": f"{video_root.rstrip('/')}/{item.uid}" if video_root else str(item.video_path),
            "caption": item.caption,
            "static_caption": caption,
            **{c: getattr(item, c) for c in STRATA_COLUMNS},
        }))
    return ("\n".join(lines) + "\n").encode()


def prepare(
    csv: str, n: int, out: str, *, rewriter: str = "rule", seed: int = 0, bins: int = 4,
    video_dir: str | None = None,
) -> dict[str, dict[str, float]]:
    """Sample, rewrite and commit the subset as the artifact ``<out>/subset``; returns the report."""
    import warnings

    from vidalign.data.benchmarks import MissingVideosWarning, load_openvid
    from vidalign.store import commit_artifact, is_store_uri, materialize, open_store

    store = open_store(out)
    remote_videos = bool(video_dir) and is_store_uri(video_dir)
    with warnings.catch_warnings():
        if remote_videos:  # files in a store: nothing to check on the local disk
            warnings.simplefilter("ignore", MissingVideosWarning)
        source = load_openvid(materialize(csv) if is_store_uri(csv) else csv,
                              video_dir=None if remote_videos else video_dir).items
    subset = stratified_sample(source, n, seed=seed, bins=bins)
    if rewriter == "llm":
        chosen: Rewriter = LLMRewriter.from_env(cache=store.child("static-captions"))
    elif rewriter == "rule":
        chosen = RuleBasedRewriter()
    else:
        raise InvalidInput(f"rewriter: expected 'rule' or 'llm', got {rewriter!r}")
    static = rewrite_all(subset, chosen)
    report = subset_report(source, subset)
    commit_artifact(
        store, "subset",
        {"subset.jsonl": subset_records(subset, static, video_dir if remote_videos else ""),
         "report.json": json.dumps(report, indent=2).encode()},
        producer="vidalign data prepare",
        meta={"source": csv, "n": n, "seed": seed, "bins": bins, "rewriter": chosen.name,
              "prompt_version": PROMPT_VERSION},
    )
    return report
