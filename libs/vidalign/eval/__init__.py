"""Evaluation: official answer rules, judges, scoring, a batched runner and result tables.

    from vidalign.data.benchmarks import load_benchmark
    from vidalign.eval import evaluate, markdown_table, write_result

    bench = load_benchmark("motionbench", "data/MotionBench")
    result = evaluate(bench.items, answerer, batch_size=8, frames=16)
    write_result(result, "runs/eval", name="motionbench-dev", model="qwen2.5-vl-7b+vda")

Does the model read the video? Score by option likelihood too, and ask every
question again with another clip's video (both off by default):

    result = evaluate(bench.items, videollm_answerer(llm), option_scorer=videollm_option_scorer(llm),
                      substitute=True, substitute_seed=0)
    result.likelihood, result.substitution.letter_same     # see comparison_table(result)
"""

from vidalign.eval.answers import (
    answer_letter,
    chosen_option,
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
from vidalign.eval.likelihood import (
    OptionScorer,
    VideoLLMOptionScorer,
    check_option_scores,
    choose_option,
    videollm_option_scorer,
)
from vidalign.eval.report import (
    comparison_table,
    distribution_table,
    distributions,
    markdown_table,
    result_dict,
    score_dict,
    write_result,
)
from vidalign.eval.runner import (
    Answerer,
    EvalResult,
    Prediction,
    Substitution,
    evaluate,
    read_outputs,
    score_outputs,
)
from vidalign.eval.scoring import (
    CONTROL_CATEGORIES,
    CategoryScore,
    Score,
    answer_distribution,
    score,
)
from vidalign.eval.substitution import derangement, same_choice

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
    "OptionScorer",
    "Prediction",
    "Score",
    "Substitution",
    "Verdict",
    "VideoLLMOptionScorer",
    "answer_distribution",
    "answer_letter",
    "check_option_scores",
    "choose_option",
    "chosen_option",
    "comparison_table",
    "derangement",
    "distribution_table",
    "distributions",
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
    "same_choice",
    "score",
    "score_dict",
    "score_outputs",
    "videollm_option_scorer",
    "write_result",
]
