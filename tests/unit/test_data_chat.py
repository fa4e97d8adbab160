"""Chat data in trl's conversational formats: validation with one-line errors naming the line,
the model's own chat template, the loss on assistant turns (or on every token), the cut that
drops a record with no answer token, and GAST on multi-turn data against the reference."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from peft import get_peft_model

from gastune.cli.main import main
from gastune.data import CausalLMCollator, TokenizedDataset, load_records, normalize_record, tokenize_records
from gastune.engine.gast import GastEngine
from gastune.engine.reference import reference_gast_gradients
from gastune.errors import GastuneError
from gastune.models import load_tokenizer
from gastune.training import DataConfig, GastuneTrainer
from gastune.training.adapters import build_peft_config
from tests.conftest import tiny_llama_for
from tests.helpers import LR, trainable
from tests.helpers import sgd_config as config
from tests.unit._model_folder import save_tiny_llama

SYSTEM = {"role": "system", "content": "Answer briefly."}
CHAT = [
    SYSTEM,
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "12."},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _trained_text(tok, item) -> str:
    return tok.decode([t for t, label in zip(item["input_ids"], item["labels"]) if label != -100])


# ---- formats -----------------------------------------------------------------------------------


def test_both_trl_chat_formats_load_and_normalise_idempotently(tmp_path):
    rows = [
        {"messages": CHAT, "task": "math"},
        {"prompt": CHAT[:3], "completion": CHAT[3:]},
        {
            "messages": [
                {"role": "user", "content": "Hi", "name": "x"},
                {"role": "assistant", "content": "Hello"},
            ]
        },
    ]
    records = load_records(_jsonl(tmp_path / "chat.jsonl", rows))
    assert records[0] == {"messages": CHAT, "task": "math"}
    assert records[1] == {"prompt": CHAT[:3], "completion": CHAT[3:]}
    assert records[2]["messages"][0] == {"role": "user", "content": "Hi"}  # extra keys dropped
    assert [normalize_record(r) for r in records] == records


def test_the_models_template_renders_and_only_assistant_turns_carry_the_loss(tok):
    items = tokenize_records([{"messages": CHAT}, {"prompt": CHAT[:3], "completion": CHAT[3:]}], tok)
    # the input is exactly the template's rendering, tokenised without extra specials
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert items[0]["input_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert items[1]["input_ids"] == items[0]["input_ids"]
    assert _trained_text(tok, items[0]) == "4.<|im_end|>\n12.<|im_end|>\n"
    assert _trained_text(tok, items[1]) == "12.<|im_end|>\n"  # prompt/completion: the completion's turns
    # no system turn: the template adds its own, and it is not trained on either
    (item,) = tokenize_records([{"messages": CHAT[1:3]}], tok)
    assert "You are a helpful AI assistant" in tok.decode(item["input_ids"])
    assert _trained_text(tok, item) == "4.<|im_end|>\n"


def test_chat_loss_all_trains_on_every_token(tok):
    (item,) = tokenize_records([{"messages": CHAT}], tok, chat_loss="all")
    assert item["labels"] == item["input_ids"]
    with pytest.raises(GastuneError, match="unknown chat loss 'everything'"):
        tokenize_records([{"messages": CHAT}], tok, chat_loss="everything")
    with pytest.raises(GastuneError, match="chat_loss must be one of assistant, all, got 'everything'"):
        DataConfig(chat_loss="everything")


def test_a_cut_that_leaves_no_assistant_token_drops_the_record_with_a_count(tok, caplog):
    long_user = {"role": "user", "content": "word " * 200}
    records = [{"messages": CHAT}, {"messages": [long_user, {"role": "assistant", "content": "ok"}]}]
    with caplog.at_level(logging.WARNING, logger="gastune.data.collate"):
        items = tokenize_records(records, tok, cutoff_len=64, chat_loss="all")
    assert len(items) == 1 and _trained_text(tok, items[0]).startswith("<|im_start|>system\nAnswer")
    assert "1 of 2 records lost every completion token to cutoff_len=64; dropped them" in caplog.text


def test_a_model_without_a_chat_template_is_one_clear_error(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(GastuneError, match="has no chat template, so chat records cannot be formatted"):
        tokenize_records([{"messages": CHAT}], plain)
    # prompt/completion strings need no template
    assert tokenize_records([{"prompt": "Q: ", "completion": "A"}], plain)


def test_a_template_that_is_not_prefix_stable_needs_chat_loss_all(tok):
    odd = copy.deepcopy(tok)  # marks the last turn, so a conversation's beginning renders differently
    odd.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} END{% endif %}\n{% endfor %}"
    with pytest.raises(
        GastuneError, match=r"record 1: .* not render the conversation before turn 3 .* use --chat_loss all"
    ):
        tokenize_records([{"messages": CHAT}], odd)
    (item,) = tokenize_records([{"messages": CHAT}], odd, chat_loss="all")
    assert item["labels"] == item["input_ids"] and odd.decode(item["input_ids"]).endswith("12. END")


# ---- bad records: one line naming the line -----------------------------------------------------

BAD = [
    (
        {"messages": [{"role": "bot", "content": "x"}]},
        "messages[1]: unknown role 'bot' (expected system, user, assistant)",
    ),
    (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
        "messages[2]: the assistant turn has empty content",
    ),
    ({"messages": [SYSTEM, {"role": "user", "content": "Hi"}]}, "no assistant turn in 'messages'"),
    (
        {"prompt": CHAT[:2], "completion": [{"role": "user", "content": "x"}]},
        "no assistant turn in 'completion'",
    ),
    ({"messages": "Hi there"}, "field 'messages' must be a list of {role, content} messages, got str"),
    ({"messages": []}, "field 'messages' is an empty list of messages"),
    ({"messages": ["Hi"]}, "messages[1] must be an object with 'role' and 'content', got str"),
    (
        {"messages": [{"role": "user", "content": 3}]},
        "messages[1]: 'content' of the user turn must be a string, got int",
    ),
    ({"messages": [{"role": None, "content": "x"}]}, "messages[1]: 'role' must be a string, got null"),
    ({"prompt": CHAT[:2], "completion": "4."}, "field 'completion' must be a list of messages"),
    ({"messages": CHAT, "prompt": "x"}, "has both 'messages' and 'prompt'"),
]


@pytest.mark.parametrize("row,message", BAD)
def test_bad_chat_records_name_their_line(tmp_path, row, message):
    path = _jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, row])
    with pytest.raises(GastuneError) as info:
        load_records(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path} line 2: ") and message in text, text


def test_data_check_counts_chat_and_reports_tokens(tmp_path, capsys, tok):
    model = save_tiny_llama(tmp_path / "model")
    rows = [
        {"messages": CHAT},
        {"prompt": CHAT[:3], "completion": CHAT[3:]},
        {"prompt": "Q: ", "completion": "A"},
    ]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    assert main(["data", "check", str(path), "--model", str(model), "--cutoff_len", "40"]) == 0
    out = capsys.readouterr().out
    assert "3 records (1 with a prompt, 0 plain text, 2 chat)" in out
    assert "chat: 10 turns, 4 assistant turns" in out
    longest = len(tokenize_records([{"messages": CHAT}], tok)[0]["input_ids"])
    # the prompt/completion record trains on its last turn only, which the cut removes
    assert f"longest {longest}; cutoff_len=40 cuts 2 records and drops 1" in out
    _jsonl(path, [{"messages": CHAT}, {"messages": [{"role": "robot", "content": "x"}]}])
    assert main(["data", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "d.jsonl line 2: messages[1]: unknown role 'robot'" in err


def test_gastune_train_on_chat_data(tmp_path, capsys):
    model = save_tiny_llama(tmp_path / "model")
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 4)
    out = tmp_path / "run"
    argv = ["train", "--model", str(model), "--data", str(path), "--method", "gast", "--gast_k", "2"]
    argv += ["--per_device_train_batch_size", "4", "--max_steps", "1", "--output_dir", str(out)]
    argv += ["--lora_r", "2", "--lora_alpha", "4", "--use_cpu", "true", "--report_to", "none"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "gastune_config.json").read_text())["data"]["chat_loss"] == "assistant"


# ---- GAST on multi-turn data equals the one-sample-at-a-time reference -------------------------


def test_gast_step_on_multi_turn_chat_equals_reference(tok, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    conversations = []
    for i in range(8):  # different lengths and turn counts, so per-sample losses differ
        turns = [SYSTEM] if i % 2 else []
        for j in range(1 + i % 3):
            turns += [
                {"role": "user", "content": f"What is {i} plus {j}?"},
                {"role": "assistant", "content": f"It is {i + j}." + " Indeed." * (i % 4)},
            ]
        conversations.append({"messages": turns})
    dataset = TokenizedDataset.from_records(conversations, tok)
    assert any(label == -100 for label in dataset[0]["labels"])  # the user turns are masked

    base = tiny_llama_for(tok, hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
    cfg = build_peft_config(base, r=2, alpha=4, dropout=0.0)
    cfg.init_lora_weights = False  # non-zero B: every adapter tensor has a gradient
    model = get_peft_model(base, cfg)
    before = copy.deepcopy(model)
    collate = CausalLMCollator(tok)
    batches = []

    def recording_collator(features):
        batches.append(collate(features))
        return batches[-1]

    seeds = []
    engine_step = GastEngine.step

    def recording_step(self, batch_size, support=None, step_seed=0, **kwargs):
        seeds.append(step_seed)
        return engine_step(self, batch_size, support, step_seed, **kwargs)

    monkeypatch.setattr(GastEngine, "step", recording_step)
    args = config(method="gast", gast_k=2, gast_support="batch")
    trainer = GastuneTrainer(model=model, args=args, train_dataset=dataset, data_collator=recording_collator)
    trainer.train()

    batch = {k: v for k, v in batches[0].items() if k != "index"}
    assert len(seeds) == 1 and batch["input_ids"].shape[0] == 4
    ref = reference_gast_gradients(before, batch, args.gast_settings(), None, seeds[0])
    names = {id(p): n for n, p in before.named_parameters()}
    after = trainable(model)
    assert set(after) == {names[key] for key in ref}
    for key, grad in ref.items():
        expected = before.get_parameter(names[key]).detach() - LR * grad
        torch.testing.assert_close(after[names[key]], expected, rtol=1e-5, atol=1e-6)
    # selection mattered: a dense step would have moved some adapter elsewhere
    dense = reference_gast_gradients(before, batch, args.gast_settings().__class__(k=4), None, seeds[0])
    assert any(not torch.allclose(dense[key], grad, atol=1e-6) for key, grad in ref.items())


def test_gastune_train_with_a_model_without_a_chat_template_is_one_line(tmp_path, capsys):
    model = save_tiny_llama(tmp_path / "model")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(str(model)).chat_template is None
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 4)
    out = tmp_path / "run"
    argv = ["train", "--model", str(model), "--data", str(path), "--max_steps", "1", "--output_dir", str(out)]
    capsys.readouterr()  # the model's save progress bars
    assert main([*argv, "--use_cpu", "true", "--report_to", "none"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "has no chat template, so chat records cannot be formatted" in err
    assert not out.exists()
