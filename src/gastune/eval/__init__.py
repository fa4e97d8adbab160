"""Evaluation: log-likelihood multiple-choice scoring of the commonsense tasks and reports."""

from gastune.eval.loglik import evaluate_commonsense, score_candidates
from gastune.eval.report import (
    format_comparison_table,
    format_results_table,
    read_results,
    results_document,
    write_json,
)
from gastune.eval.result import EvalResult, Prediction, TaskScore, aggregate

__all__ = [
    "EvalResult",
    "Prediction",
    "TaskScore",
    "aggregate",
    "evaluate_commonsense",
    "format_comparison_table",
    "format_results_table",
    "read_results",
    "results_document",
    "score_candidates",
    "write_json",
]
