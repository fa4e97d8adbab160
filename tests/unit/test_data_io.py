"""Reading user data (three schemas, three containers), its errors, and writing record files."""

from __future__ import annotations

import json
import os

import datasets
import pytest

from gastune.cli.main import main
from gastune.data.io import load_records, normalize_record, write_records
from gastune.data.prompts import ALPACA_HEADER, ALPACA_HEADER_WITH_INPUT, format_prompt
from gastune.errors import GastuneError

INSTRUCTION = {"instruction": "Add.", "input": "2 and 2", "output": "4", "answer": "4", "task": "math"}
PROMPT = {"prompt": "Q: capital of France?\nA: ", "completion": "Paris"}
TEXT = {"text": "Plain text to model."}

EXPECTED = [
    {
        "prompt": f"{ALPACA_HEADER_WITH_INPUT}\n\n### Instruction:\nAdd.\n\n### Input:\n2 and 2\n\n### Response:\n",
        "completion": "4",
        "task": "math",
        "answer": "4",
    },
    {"prompt": "Q: capital of France?\nA: ", "completion": "Paris"},
    {"prompt": "", "completion": "Plain text to model."},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- the three schemas in the three containers -----------------------------------------------


def test_jsonl_with_all_three_schemas(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [INSTRUCTION, PROMPT, TEXT])
    assert load_records(path) == EXPECTED


def test_json_list_and_str_path(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([INSTRUCTION, PROMPT, TEXT], indent=2))
    assert load_records(str(path)) == EXPECTED


def test_saved_dataset_folder_with_mixed_schemas(tmp_path):
    # A dataset holding several schemas fills the missing columns with None: those are absent.
    rows = [INSTRUCTION, PROMPT, TEXT]
    columns = {
        key: [row.get(key) for row in rows]
        for key in ("instruction", "input", "output", "answer", "task", "prompt", "completion", "text")
    }
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "ds"))
    assert load_records(tmp_path / "ds") == EXPECTED


def test_saved_dataset_dict_uses_its_train_split(tmp_path):
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([PROMPT]), "test": datasets.Dataset.from_list([TEXT])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "dd") == [EXPECTED[1]]


def test_instruction_without_input_uses_the_short_header():
    record = normalize_record({"instruction": "Say hi.", "output": "hi"})
    assert record == {"prompt": format_prompt("Say hi."), "completion": "hi"}
    assert record["prompt"] == f"{ALPACA_HEADER}\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    assert normalize_record({"instruction": "Say hi.", "input": None, "output": "hi"}) == record


def test_commonsense_record_normalises_like_the_evaluator_prompts_it():
    record = {
        "instruction": "Q?",
        "input": "",
        "output": "the correct answer is true",
        "answer": "true",
        "task": "boolq",
    }
    assert normalize_record(record) == {
        "prompt": format_prompt("Q?", ""),
        "completion": "the correct answer is true",
        "task": "boolq",
        "answer": "true",
    }


def test_normalising_twice_changes_nothing():
    once = normalize_record(INSTRUCTION)
    assert normalize_record(once) == once


def test_jsonl_blank_lines_are_skipped_and_jsonl_named_json_is_read(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PROMPT) + "\n\n" + json.dumps(TEXT) + "\n  \n")
    assert load_records(path) == EXPECTED[1:]
    misnamed = tmp_path / "lines.json"
    misnamed.write_text(path.read_text())
    assert load_records(misnamed) == EXPECTED[1:]


# ---- user errors: each names the file and the record or line ---------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(GastuneError, match=r"data not found: .*nope\.jsonl"):
        load_records(tmp_path / "nope.jsonl")


def test_malformed_json_line_gives_its_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PROMPT) + "\n" + '{"prompt": "x", "completion": }\n')
    with pytest.raises(GastuneError, match=r"d\.jsonl line 2: malformed JSON \(Expecting value, column 31\)"):
        load_records(path)


def test_malformed_json_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"prompt": "x",\n "completion": "y"},\n]')
    with pytest.raises(GastuneError, match=r"d\.json: malformed JSON \(.*line 3 column 1\)"):
        load_records(path)


@pytest.mark.parametrize(("row", "kind"), [([1, 2], "list"), ("text", "str"), (3, "int"), (None, "null")])
def test_record_that_is_not_an_object(tmp_path, row, kind):
    path = _write_jsonl(tmp_path / "d.jsonl", [PROMPT, PROMPT, row])
    with pytest.raises(
        GastuneError, match=rf"d\.jsonl line 3: expected an object with fields .*, got {kind}"
    ):
        load_records(path)


def test_json_top_level_must_be_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(PROMPT))
    with pytest.raises(GastuneError, match=r"d\.json: expected a JSON list of records, got a dict"):
        load_records(path)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"instruction": "x"},
            r"missing field 'output' \(schema instruction/input/output \(needs 'instruction'",
        ),
        ({"output": "x", "input": "y"}, r"missing field 'instruction' \(schema instruction/input/output"),
        ({"prompt": "x"}, r"missing field 'completion' \(schema prompt/completion \(needs both\)\)"),
        ({"completion": "x"}, r"missing field 'prompt' \(schema prompt/completion"),
        (
            {"question": "x", "label": 1},
            r"no known fields \(found: label, question\); expected the fields instruction/",
        ),
        ({}, r"no known fields \(found: none\)"),
    ],
)
def test_missing_fields_name_the_expected_schema(tmp_path, row, message):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([PROMPT, row]))
    with pytest.raises(GastuneError, match=r"d\.json record 2: " + message):
        load_records(path)


@pytest.mark.parametrize(
    ("row", "field", "kind"),
    [
        ({"prompt": "x", "completion": 4}, "completion", "int"),
        ({"prompt": 3, "completion": "y"}, "prompt", "int"),  # a list is chat: test_data_chat.py
        ({"instruction": "x", "input": 1.5, "output": "y"}, "input", "float"),
        ({"text": {"a": 1}}, "text", "dict"),
        ({"prompt": "x", "completion": "y", "task": 3}, "task", "int"),
    ],
)
def test_wrong_types(tmp_path, row, field, kind):
    path = _write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(GastuneError, match=rf"d\.jsonl line 1: field '{field}' must be a string, got {kind}"):
        load_records(path)


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"prompt": "x", "completion": ""}, "completion"),
        ({"text": "  \n"}, "text"),
        ({"instruction": "x", "output": ""}, "output"),
    ],
)
def test_empty_completion(tmp_path, row, field):
    path = _write_jsonl(tmp_path / "d.jsonl", [PROMPT, row])
    with pytest.raises(
        GastuneError, match=rf"line 2: field '{field}' is empty, so there is nothing to train on"
    ):
        load_records(path)


@pytest.mark.parametrize(
    ("name", "content"), [("d.jsonl", ""), ("d.jsonl", "\n\n"), ("d.json", "[]"), ("d.json", " ")]
)
def test_empty_dataset(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(GastuneError, match=r"empty dataset"):
        load_records(path)


def test_unsupported_file_and_non_dataset_folder(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,completion\n")
    with pytest.raises(GastuneError, match=r"d\.csv: unsupported data file"):
        load_records(tmp_path / "d.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(GastuneError, match=r"folder: not a dataset folder written by save_to_disk"):
        load_records(tmp_path / "folder")


def test_dataset_dict_without_train(tmp_path):
    datasets.DatasetDict({"test": datasets.Dataset.from_list([TEXT])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(GastuneError, match=r"without a 'train' split \(splits: test\)"):
        load_records(tmp_path / "dd")


# ---- writing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["out.json", "nested/dir/out.JSONL"])
def test_write_records_round_trips(tmp_path, name):
    records = [INSTRUCTION, {"text": "non-ASCII: é ü 中"}]
    path = write_records(iter(records), tmp_path / name)
    assert path == tmp_path / name
    text = path.read_text(encoding="utf-8")
    assert "中" in text  # written as UTF-8, not escaped
    loaded = json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]
    assert loaded == records
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_write_records_replaces_atomically_and_keeps_the_old_file_on_failure(tmp_path):
    path = write_records([TEXT], tmp_path / "out.jsonl")
    write_records([PROMPT, TEXT], path)
    assert len(path.read_text().splitlines()) == 2
    with pytest.raises(TypeError):
        write_records([PROMPT, {"bad": object()}], path)
    assert len(path.read_text().splitlines()) == 2  # the previous content survives
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_write_records_refuses_other_extensions(tmp_path):
    with pytest.raises(GastuneError, match=r"out\.txt: cannot write records there \(the name must end in"):
        write_records([TEXT], tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_check(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "d.jsonl", [INSTRUCTION, PROMPT, TEXT])
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 records (2 with a prompt, 1 plain text, 0 chat)" in out and "math: 1" in out
    _write_jsonl(path, [PROMPT, {"prompt": 1}])
    assert main(["data", "check", str(path)]) == 2
    assert "d.jsonl line 2: field 'prompt' must be a string, got int" in capsys.readouterr().err
