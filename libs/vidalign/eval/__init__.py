"""Evaluation: official answer rules, judges, scoring, a batched runner and result tables.

    from vidalign.data.benchmarks import load_benchmark
    from vidalign.eval import evaluate, markdown_table, write_result

    bench = load_benchmark("motionbench", "data/MotionBench")
    result = evaluate(bench.items, answerer, batch_size=8, frames=16)
    write_result(result, "runs/eval", name="motionbench-dev", model="qwen2.5-vl-7b+vda")
"""

from vidalign.eval.answers import (
    favor_judge,
    is_correct,
    parse_motionbench_answer,
    parse_videomme_answer,
)
from vidalign.eval.baselines import BASELINES
from vidalign.eval.judges import (
    ExactMatchJudge,
    Judge,
    LLMJudge,
    OpenEndedRecord,
    OpenEndedScore,
    Verdict,
    judge_all,
    parse_verdict,
)
from vidalign.eval.report import markdown_table, result_dict, write_result
from vidalign.eval.runner import (
    Answerer,
    EvalResult,
    Prediction,
    evaluate,
    read_outputs,
    score_outputs,
)
from vidalign.eval.scoring import CONTROL_CATEGORIES, CategoryScore, Score, score

__all__ = [
    "BASELINES",
    "CONTROL_CATEGORIES",
    "Answerer",
    "CategoryScore",
    "EvalResult",
    "ExactMatchJudge",
    "Judge",
    "LLMJudge",
    "OpenEndedRecord",
    "OpenEndedScore",
    "Prediction",
    "Score",
    "Verdict",
    "evaluate",
    "favor_judge",
    "is_correct",
    "judge_all",
    "markdown_table",
    "parse_motionbench_answer",
    "parse_verdict",
    "parse_videomme_answer",
    "read_outputs",
    "result_dict",
    "score",
    "score_outputs",
    "write_result",
]
