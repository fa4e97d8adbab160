"""Tokenisation, truncation and padding, checked against hand-built ids on a word-level tokenizer."""

from __future__ import annotations

import logging

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from gastune.data.collate import IGNORE_INDEX, CausalLMCollator, TokenizedDataset, tokenize_records
from gastune.data.prompts import format_prompt
from gastune.errors import GastuneError

WORDS = ["<pad>", "<eos>", "<unk>", "<bos>", "q", "a", "b", "c", "d", "e"]
PAD, EOS, UNK, BOS, Q, A, B, C, D, E = range(len(WORDS))
M = IGNORE_INDEX


def _word_tokenizer(bos: bool = False, pad: bool = True, eos: bool = True):
    """Whitespace-split words -> ids of WORDS: every id below is predictable by hand."""
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        core.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", BOS)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        eos_token="<eos>" if eos else None,
        pad_token="<pad>" if pad else None,
        bos_token="<bos>" if bos else None,
    )


@pytest.fixture(scope="module")
def tok():
    return _word_tokenizer()


RECORDS = [{"prompt": "q a ", "completion": "b c"}, {"prompt": "", "completion": "d"}]


def test_tokenize_appends_eos_and_trains_on_prompt_by_default(tok):
    items = tokenize_records(RECORDS, tok)
    assert items == [
        {"input_ids": [Q, A, B, C, EOS], "attention_mask": [1] * 5, "labels": [Q, A, B, C, EOS]},
        {"input_ids": [D, EOS], "attention_mask": [1, 1], "labels": [D, EOS]},
    ]


def test_tokenize_masks_the_prompt_when_not_training_on_it(tok):
    items = tokenize_records(RECORDS, tok, train_on_prompt=False)
    assert [i["labels"] for i in items] == [[M, M, B, C, EOS], [D, EOS]]
    assert [i["input_ids"] for i in items] == [[Q, A, B, C, EOS], [D, EOS]]


def test_tokenize_adds_leading_special_tokens_once_and_masks_them_with_the_prompt():
    items = tokenize_records(RECORDS, _word_tokenizer(bos=True), train_on_prompt=False)
    assert [i["input_ids"] for i in items] == [[BOS, Q, A, B, C, EOS], [BOS, D, EOS]]
    assert [i["labels"] for i in items] == [[M, M, M, B, C, EOS], [M, D, EOS]]


def test_tokenize_accepts_instruction_records(tok):
    record = {"instruction": "q", "input": "", "output": "a b", "answer": "x", "task": "t"}
    (item,) = tokenize_records([record], tok, cutoff_len=1000, train_on_prompt=False)
    n_prompt = len(tok(format_prompt("q"), add_special_tokens=False)["input_ids"])
    assert item["labels"] == [M] * n_prompt + [A, B, EOS]


def test_truncation_cuts_from_the_right_including_the_eos(tok, caplog):
    with caplog.at_level(logging.INFO, logger="gastune.data.collate"):
        items = tokenize_records(
            [{"prompt": "q a ", "completion": "b c d e"}], tok, cutoff_len=4, train_on_prompt=False
        )
    assert items == [{"input_ids": [Q, A, B, C], "attention_mask": [1] * 4, "labels": [M, M, B, C]}]
    assert "1 of 1 records were cut to cutoff_len=4" in caplog.text


def test_records_that_lose_every_target_token_are_counted_and_dropped(tok, caplog):
    """Never trained on their prompt alone, whatever train_on_prompt says."""
    records = [
        {"prompt": "q a b c ", "completion": "d"},  # prompt alone fills cutoff_len=4
        {"prompt": "q ", "completion": "e"},
        {"prompt": "q a b c d ", "completion": "e"},  # prompt longer than cutoff_len
    ]
    for train_on_prompt, labels in ((True, [Q, E, EOS]), (False, [M, E, EOS])):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gastune.data.collate"):
            items = tokenize_records(records, tok, cutoff_len=4, train_on_prompt=train_on_prompt)
        assert items == [{"input_ids": [Q, E, EOS], "attention_mask": [1, 1, 1], "labels": labels}]
        assert "2 of 3 records lost every completion token to cutoff_len=4; dropped them" in caplog.text


def test_errors(tok):
    with pytest.raises(GastuneError, match="no record keeps a completion token within cutoff_len=2"):
        tokenize_records([{"prompt": "q a b ", "completion": "c"}], tok, cutoff_len=2, train_on_prompt=False)
    with pytest.raises(GastuneError, match="cutoff_len must be at least 2"):
        tokenize_records(RECORDS, tok, cutoff_len=1)
    with pytest.raises(GastuneError, match="no records to tokenize"):
        tokenize_records([], tok)
    with pytest.raises(GastuneError, match="the tokenizer has no EOS token"):
        tokenize_records(RECORDS, _word_tokenizer(eos=False))
    with pytest.raises(GastuneError, match=r"record 2: missing field 'completion'"):
        tokenize_records([RECORDS[0], {"prompt": "q"}], tok)


# ---- collator ----------------------------------------------------------------------------------


def test_collator_right_pads_with_masked_labels(tok):
    features = [
        {"input_ids": [Q, A, B], "attention_mask": [1, 1, 1], "labels": [M, A, B]},
        {"input_ids": [C], "attention_mask": [1], "labels": [C]},
    ]
    batch = CausalLMCollator(tok)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[Q, A, B], [C, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[M, A, B], [C, M, M]]


def test_collator_pads_with_eos_when_there_is_no_pad_token_and_keeps_the_real_eos_label():
    collate = CausalLMCollator(_word_tokenizer(pad=False))
    batch = collate(
        [{"input_ids": [Q, EOS], "labels": [Q, EOS]}, {"input_ids": [A, B, C, EOS], "labels": [A, B, C, EOS]}]
    )
    assert batch["input_ids"].tolist() == [[Q, EOS, EOS, EOS], [A, B, C, EOS]]
    assert batch["labels"].tolist() == [[Q, EOS, M, M], [A, B, C, EOS]]  # pads masked by position, not id
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_collator_pad_to_multiple_of_and_defaults(tok):
    batch = CausalLMCollator(tok, pad_to_multiple_of=4)([{"input_ids": [Q, A, B, C, D]}, {"input_ids": [E]}])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"].tolist()[0] == [Q, A, B, C, D, M, M, M]  # no labels given: copy of input_ids
    assert batch["attention_mask"].sum(1).tolist() == [5, 1]


def test_collator_passes_extra_keys_through(tok):
    features = [
        {"input_ids": [Q], "index": 7, "weight": 0.5, "task": "piqa"},
        {"input_ids": [A, B], "index": 2, "weight": 1.0, "task": "boolq"},
    ]
    batch = CausalLMCollator(tok)(features)
    assert batch["index"].tolist() == [7, 2] and batch["index"].dtype == torch.long
    assert batch["weight"].tolist() == [0.5, 1.0]
    assert batch["task"] == ["piqa", "boolq"]
    with pytest.raises(ValueError, match="'index' is missing from some features"):
        CausalLMCollator(tok)([{"input_ids": [Q], "index": 1}, {"input_ids": [A]}])


def test_collator_needs_a_pad_or_eos_token():
    with pytest.raises(GastuneError, match="neither a pad nor an EOS token"):
        CausalLMCollator(_word_tokenizer(pad=False, eos=False))


# ---- dataset -----------------------------------------------------------------------------------


def test_tokenized_dataset_items_carry_their_index_through_a_dataloader(tok):
    data = TokenizedDataset.from_records(RECORDS * 3, tok, train_on_prompt=False)
    assert len(data) == 6
    assert data[1] == {"input_ids": [D, EOS], "attention_mask": [1, 1], "labels": [D, EOS], "index": 1}
    assert data[-1]["index"] == 5
    with pytest.raises(IndexError):
        data[6]
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=CausalLMCollator(tok))
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5]]
    assert batches[0]["labels"].tolist()[1] == [D, EOS, M, M, M]
    assert "index" not in data._items[0]  # the stored items are not mutated


def test_real_default_tokenizer_masks_exactly_the_alpaca_prompt():
    from gastune.models.loading import cache_dir, load_tokenizer

    if not (cache_dir() / "SmolLM2-135M-Instruct" / "tokenizer.json").is_file():
        pytest.skip("the default model is not converted into the cache yet")
    tokenizer = load_tokenizer("smollm2-135m")
    record = {"instruction": "Is water wet?", "input": "", "output": "the correct answer is true"}
    (item,) = tokenize_records([record], tokenizer, train_on_prompt=False)
    target = [t for t in item["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(target) == "the correct answer is true" + tokenizer.eos_token
    prompt_ids = item["input_ids"][: len(item["labels"]) - len(target)]
    assert tokenizer.decode(prompt_ids) == format_prompt("Is water wet?")
