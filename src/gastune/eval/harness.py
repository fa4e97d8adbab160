"""The commonsense tasks in lm-evaluation-harness (``lm_eval``), offline, with gastune's prompts.

:func:`write_harness_tasks` writes, per task, the questions as JSON lines (the same records
``gastune eval`` scores: ``load_commonsense`` with the same split, sample and seed) and an
lm-eval task YAML that reads them from that local file (``dataset_path: json``), plus a group
``gastune_commonsense_<format>``. No file comes from a hub. The prompt is gastune's
(``format_prompt`` of the record) and the choices are the responses gastune ranks
(``answer_text`` of each label or option text), so lm-eval's ``acc`` is an independent
implementation of gastune's ``rule="sum"`` accuracy on the same questions.

One difference in the numbers, not the ranking: lm-eval moves the context's trailing
whitespace (the prompt's final newline) into every continuation, so each candidate's
log-likelihood includes the same ``log p("\\n" | prompt)``; the argmax is unchanged.
``acc_norm`` (length-normalised by bytes) is lm-eval's own and has no gastune counterpart.

The YAMLs also work with the plain ``lm_eval`` command line::

    lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER \\
        --include_path TASKS_DIR --tasks gastune_commonsense_mc

Example:
    >>> names = write_harness_tasks("lm_eval_tasks", tasks=["piqa"], per_task=10)  # doctest: +SKIP
    >>> names  # doctest: +SKIP
    ['gastune_piqa_mc']
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from gastune.data.prompts import format_prompt
from gastune.errors import GastuneError

INSTALL_HINT = 'pip install "gastune[lm-eval]" (lm_eval[hf]==0.4.13)'


def task_name(task: str, prompt_format: str) -> str:
    """The lm-eval task name gastune gives a commonsense task in a prompt format."""
    return f"gastune_{task}_{prompt_format}"


def group_name(prompt_format: str) -> str:
    """The lm-eval group of all the tasks written for a prompt format."""
    return f"gastune_commonsense_{prompt_format}"


def harness_doc(record: dict, prompt_format: str, index: int = 0) -> dict:
    """One lm-eval document: gastune's prompt, the responses it ranks, the gold index."""
    # The label set and candidates exactly as gastune's scorer builds them.
    from gastune.eval.loglik import _candidates, _check_record

    labels = _check_record(index, record)
    return {
        "query": format_prompt(record["instruction"], record.get("input", "")),
        "choices": _candidates(index, record, labels, prompt_format),
        "gold": labels.index(record["answer"]),
    }


def _task_yaml(name: str, data_file: Path) -> str:
    # JSON is valid YAML: no quoting pitfalls with paths or names.
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(data_file.resolve())}},
        "validation_split": "validation",
        "output_type": "multiple_choice",
        # Field names: lm-eval reads doc[field] directly (no template rendering).
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": "",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    return json.dumps(config, indent=2) + "\n"


def write_harness_tasks(
    folder: str | Path,
    tasks: Sequence[str] | None = None,
    split: str = "validation",
    per_task: int | None = None,
    seed: int = 0,
    prompt_format: str = "mc",
) -> list[str]:
    """Write the data and lm-eval task YAMLs of the commonsense tasks to ``folder``.

    Returns the task names (``gastune_<task>_<format>``); the group
    ``gastune_commonsense_<format>`` holds them all.
    """
    from gastune.data.commonsense import load_commonsense
    from gastune.data.prompts import COMMONSENSE_TASKS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = load_commonsense(split, tasks=tasks, per_task=per_task, seed=seed, prompt_format=prompt_format)
    names = []
    for task in [t for t in COMMONSENSE_TASKS if any(r["task"] == t for r in records)]:
        name = task_name(task, prompt_format)
        data_file = folder / f"{name}.jsonl"
        lines = [
            json.dumps(harness_doc(r, prompt_format, i)) for i, r in enumerate(records) if r["task"] == task
        ]
        data_file.write_text("\n".join(lines) + "\n")
        (folder / f"{name}.yaml").write_text(_task_yaml(name, data_file))
        names.append(name)
    group = {"group": group_name(prompt_format), "task": names, "aggregate_metric_list": []}
    group["aggregate_metric_list"] = [
        {"metric": m, "aggregation": "mean", "weight_by_size": False} for m in ("acc", "acc_norm")
    ]
    (folder / f"{group_name(prompt_format)}.yaml").write_text(json.dumps(group, indent=2) + "\n")
    return names


def run_harness(model, tokenizer, tasks_dir: str | Path, names: Sequence[str], batch_size: int = 16) -> dict:
    """lm-eval's ``simple_evaluate`` of an in-memory model on tasks written by
    :func:`write_harness_tasks`, offline. Returns lm-eval's results dictionary (with samples).
    """
    # Never reach a hub: the data files are local and the model is already loaded.
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise GastuneError(f"lm-evaluation-harness is not installed: {INSTALL_HINT}") from exc
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    results = simple_evaluate(model=lm, tasks=list(names), task_manager=manager, log_samples=True)
    if results is None:
        raise GastuneError("lm-eval returned no results")
    return results
