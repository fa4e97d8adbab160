"""Read user training data into one shape, and write record files atomically.

``load_records`` accepts a ``.json`` file (a list of objects), a ``.jsonl`` file (one object
a line) or a folder written by ``datasets.Dataset.save_to_disk``, in any of three schemas:

- ``instruction`` / ``input`` (optional) / ``output`` (/ ``answer``): the LLM-Adapters and
  Alpaca records; the prompt is ``format_prompt(instruction, input)``;
- ``prompt`` / ``completion``;
- ``text``: plain text, all of it a training target;
- trl's conversational formats, ``messages`` or message-list ``prompt``/``completion``
  (``gastune.data.chat``; the model's chat template formats them at tokenisation).

Every record becomes ``{"prompt": str, "completion": str}`` (keeping ``task`` and ``answer``
when present), a chat record its validated messages; every problem is a ``GastuneError``
naming the file and the record or line.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from gastune.data.chat import is_chat, normalize_chat
from gastune.data.prompts import format_prompt
from gastune.errors import GastuneError

__all__ = ["SCHEMAS", "load_records", "normalize_record", "record_file_format", "write_records"]

SCHEMAS = "instruction/input/output, prompt/completion, text, or chat messages"
_KEPT = ("task", "answer")  # optional fields carried through to the normalised record


def load_records(source: str | os.PathLike) -> list[dict]:
    """Load and normalise user training data from a JSON/JSONL file or a saved dataset folder.

    Example:
        >>> import json, pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "data.jsonl"
        >>> _ = path.write_text(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\\n")
        >>> load_records(path)
        [{'prompt': '2+2=', 'completion': '4'}]
    """
    path = Path(source)
    if not path.exists():
        raise GastuneError(f"data not found: {path}")
    if path.is_dir():
        rows = ((f"{path} record {i + 1}", row) for i, row in enumerate(_saved_dataset_rows(path)))
    elif path.suffix.lower() == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix.lower() == ".json":
        rows = _json_rows(path)
    else:
        raise GastuneError(
            f"{path}: unsupported data file (use .json, .jsonl, or a datasets.save_to_disk folder)"
        )
    records = [normalize_record(row, where) for where, row in rows]
    if not records:
        raise GastuneError(f"{path}: empty dataset (no records)")
    return records


def normalize_record(record: Any, where: str = "record") -> dict:
    """One record in any accepted schema as ``{"prompt", "completion"}`` (+ ``task``/``answer``).

    Fields set to ``None`` count as absent (saved datasets that mix schemas fill them so).

    Example:
        >>> normalize_record({"text": "Hello."})
        {'prompt': '', 'completion': 'Hello.'}
        >>> normalize_record({"instruction": "Say hi", "output": "hi"})["prompt"].endswith("### Response:\\n")
        True
    """
    if not isinstance(record, Mapping):
        raise GastuneError(f"{where}: expected an object with fields {SCHEMAS}, got {_type_name(record)}")
    if is_chat(record):  # trl's conversational formats
        return normalize_chat(record, where)
    present = {key for key, value in record.items() if value is not None}
    if present & {"instruction", "output"}:
        schema = "instruction/input/output (needs 'instruction' and 'output'; 'input' is optional)"
        instruction = _string(record, "instruction", where, schema)
        input_text = _string(record, "input", where, schema) if "input" in present else ""
        prompt, completion, target = (
            format_prompt(instruction, input_text),
            _string(record, "output", where, schema),
            "output",
        )
    elif present & {"prompt", "completion"}:
        schema = "prompt/completion (needs both)"
        prompt, completion, target = (
            _string(record, "prompt", where, schema),
            _string(record, "completion", where, schema),
            "completion",
        )
    elif "text" in present:
        prompt, completion, target = "", _string(record, "text", where, "text"), "text"
    else:
        found = ", ".join(sorted(k if str(k).isprintable() else repr(k) for k in map(str, present))) or "none"
        raise GastuneError(f"{where}: no known fields (found: {found}); expected the fields {SCHEMAS}")
    if not completion.strip():
        raise GastuneError(f"{where}: field '{target}' is empty, so there is nothing to train on")
    out = {"prompt": prompt, "completion": completion}
    for key in _KEPT:
        if key in present:
            out[key] = _string(record, key, where, f"optional '{key}'")
    return out


def write_records(records: Iterable[Mapping], path: str | os.PathLike) -> Path:
    """Write records as a JSON list (``.json``) or JSON Lines (``.jsonl``), atomically.

    The file is written under a temporary name in the same folder and renamed into place, so
    a reader never sees half a file and an interrupted write leaves the old file intact.

    Example:
        >>> import pathlib, tempfile
        >>> out = write_records([{"text": "hi"}], pathlib.Path(tempfile.mkdtemp()) / "a.jsonl")
        >>> out.read_text()
        '{"text": "hi"}\\n'
    """
    path = Path(path)
    suffix = record_file_format(path)
    records = list(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if suffix == ".jsonl":
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            else:
                json.dump(records, f, ensure_ascii=False, indent=2)
                f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a data file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def record_file_format(path: str | os.PathLike) -> str:
    """``".json"`` or ``".jsonl"``: the format ``write_records`` picks for ``path`` by its name.

    Example:
        >>> record_file_format("out/train.JSONL")
        '.jsonl'
    """
    suffix = Path(path).suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise GastuneError(f"{path}: cannot write records there (the name must end in .json or .jsonl)")
    return suffix


def _string(record: Mapping, key: str, where: str, schema: str) -> str:
    if record.get(key) is None:
        raise GastuneError(f"{where}: missing field '{key}' (schema {schema})")
    value = record[key]
    if not isinstance(value, str):
        raise GastuneError(f"{where}: field '{key}' must be a string, got {_type_name(value)}")
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _decode(raw: bytes, path: Path, line_no: int | None = None, offset: int = 0) -> str:
    """``raw`` as UTF-8 text (a leading byte-order mark is dropped), or a one-line error that
    names the file, the line and the byte offset of the first byte that is not UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = offset + exc.start
        line = line_no if line_no is not None else raw.count(b"\n", 0, exc.start) + 1
        raise GastuneError(
            f"{path} line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte offset {at}); "
            "save the file as UTF-8"
        ) from None
    return text[1:] if offset == 0 and text.startswith("\ufeff") else text


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    offset, first = 0, True
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode(raw, path, line_no, offset)
            offset += len(raw)
            if not line.strip():
                continue  # blank lines (a trailing newline, say) are not records
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, too many digits, nesting
                if first and line.lstrip().startswith("["):  # a pretty-printed array
                    raise GastuneError(
                        f"{path} line {line_no}: this looks like a JSON array, but a .jsonl file holds one "
                        "JSON object per line; save a list of records as .json instead"
                    ) from None
                raise GastuneError(
                    f"{path} line {line_no}: malformed JSON ({_json_problem(exc, one_line=True)})"
                ) from None
            if first and isinstance(row, list):
                raise GastuneError(
                    f"{path} line {line_no}: a JSON array, but a .jsonl file holds one JSON object per "
                    "line; save a list of records as .json instead"
                )
            first = False
            yield f"{path} line {line_no}", row


def _json_problem(exc: Exception, one_line: bool = False) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return (
            f"{exc.msg}, column {exc.colno}"
            if one_line
            else f"{exc.msg}, line {exc.lineno} column {exc.colno}"
        )
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    text = _decode(path.read_bytes(), path)
    if not text.strip():
        raise GastuneError(f"{path}: empty dataset (the file is empty)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved under a .json name: read it as such
            yield from _jsonl_rows(path)
            return
        raise GastuneError(f"{path}: malformed JSON ({_json_problem(exc)})") from None
    except (ValueError, RecursionError) as exc:  # an integer with too many digits, deep nesting
        raise GastuneError(f"{path}: malformed JSON ({_json_problem(exc)})") from None
    if not isinstance(data, list):
        raise GastuneError(f"{path}: expected a JSON list of records, got a {_type_name(data)}")
    for i, row in enumerate(data):
        yield f"{path} record {i + 1}", row


def _saved_dataset_rows(path: Path) -> Iterator[dict]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise GastuneError(f"{path}: not a dataset folder written by save_to_disk ({exc})") from exc
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise GastuneError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(data)})")
        data = data["train"]
    yield from data
