"""Evaluation: the commonsense tasks by log-likelihood or by generation, GSM8K, reports."""

from gastune.eval.generate import evaluate_commonsense_generation, extract_label, generate_responses
from gastune.eval.gsm8k import evaluate_gsm8k, extract_number, load_gsm8k
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
    "evaluate_commonsense_generation",
    "evaluate_gsm8k",
    "extract_label",
    "extract_number",
    "format_comparison_table",
    "format_results_table",
    "generate_responses",
    "load_gsm8k",
    "read_results",
    "results_document",
    "score_candidates",
    "write_json",
]
