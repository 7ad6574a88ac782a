"""Evaluation: reference-answer loss, judged pairwise win rate (position-swapped, length-controlled),
MT-Bench-style grading, lm-evaluation-harness benchmarks, and run comparison."""

from montessori.evaluation.evaluate import evaluate
from montessori.evaluation.judge import HFJudge, HTTPJudge, Judge
from montessori.evaluation.loss import difference, example_losses, reference_answer_loss, summarize
from montessori.evaluation.winrate import Judgement, judge_pairs, win_rate

__all__ = ["evaluate", "Judge", "HFJudge", "HTTPJudge", "reference_answer_loss", "example_losses", "summarize",
           "difference", "Judgement", "judge_pairs", "win_rate"]
