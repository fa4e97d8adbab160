"""GastuneTrainer end to end on tiny models: the optimizer applies exactly the reference GAST
gradient, dense methods the plain mean, statistics reach the logs, trl's SFTTrainer works,
and bad input fails before any parameter moves.

Every run is plain SGD at a constant lr with clipping and weight decay off, so one step
changes each parameter by exactly -lr × (its gradient).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from gastune.engine import GastSettings, per_sample_loss
from gastune.engine.gast import GastEngine
from gastune.engine.reference import reference_gast_gradients
from gastune.errors import GastuneError
from gastune.training import GastMethod, GastuneMixin, GastuneTrainer
from gastune.training.adapters import build_peft_config
from tests.conftest import tiny_llama_for
from tests.helpers import LR, RecordingCollator, lora_model, row_dataset, trainable
from tests.helpers import sgd_config as config

GAST_KEYS = ("gast/alignment_chosen", "gast/negative_pick_frac", "gast/usage_cv", "gast/unused_frac")


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever the Trainer writes under output_dir lands here


def record_steps(trainer, monkeypatch) -> dict[str, list]:
    """Record what each micro-batch of ``trainer`` really used: inputs, support batch, seed."""
    seen: dict[str, list] = {"inputs": [], "support": [], "seeds": [], "records": []}
    method = trainer.method
    step = method.training_step

    def recording_step(trainer_, model, inputs, run):
        seen["inputs"].append(inputs)
        loss = step(trainer_, model, inputs, run)
        if method.engine is not None:
            seen["records"].append(list(method.engine.records))
        return loss

    monkeypatch.setattr(method, "training_step", recording_step)
    if isinstance(method, GastMethod):
        support_batch = method._support_batch

        def recording_support(trainer_):
            batch = support_batch(trainer_)
            seen["support"].append(batch)
            return batch

        monkeypatch.setattr(method, "_support_batch", recording_support)
        engine_step = GastEngine.step

        def recording_engine_step(self, batch_size, support=None, step_seed=0, **kwargs):
            seen["seeds"].append(step_seed)
            return engine_step(self, batch_size, support, step_seed, **kwargs)

        monkeypatch.setattr(GastEngine, "step", recording_engine_step)
    return seen


# ---------------------------------------------------------------- (a) one GAST step
@pytest.mark.parametrize("support", ["batch", "train"])
def test_gast_step_with_accumulation_equals_reference(support, monkeypatch):
    model = lora_model()
    before = copy.deepcopy(model)
    collator = RecordingCollator()
    args = config(
        method="gast", gast_k=2, gast_support=support, gast_support_size=3, gradient_accumulation_steps=2
    )
    trainer = GastuneTrainer(model=model, args=args, train_dataset=row_dataset(), data_collator=collator)
    seen = record_steps(trainer, monkeypatch)
    clipped = []
    monkeypatch.setattr(trainer, "_clip_grad_norm", lambda m: clipped.append(1))
    trainer.train()

    # The micro-batches are the first two training-sized batches the collator built (the
    # Trainer collates a whole accumulation window, plus one prefetched batch, up front).
    micro = [b for b in collator.batches if len(b["index"]) == 4][:2]
    assert len(seen["inputs"]) == 2
    for used, collated in zip(seen["inputs"], micro):
        assert torch.equal(used["index"], collated["index"])

    # Seeds and support draws follow GastMethod's documented generators (rank 0, seed 0).
    select_gen = torch.Generator().manual_seed(0 * 1000 + 2)
    assert seen["seeds"] == [int(torch.randint(0, 2**62, (1,), generator=select_gen)) for _ in range(2)]
    if support == "batch":
        assert not seen["support"]
        supports = [None, None]
    else:
        # Support batches are collated inside each micro-batch's step, after the training ones.
        collated = [b["index"] for b in collator.batches if len(b["index"]) == 3]
        assert [b["index"].tolist() for b in seen["support"]] == [i.tolist() for i in collated]
        support_gen = torch.Generator().manual_seed(0 * 1000 + 1)
        for batch in seen["support"]:
            assert batch["index"].tolist() == torch.randperm(16, generator=support_gen)[:3].tolist()
        supports = seen["support"]

    settings = args.gast_settings()
    refs = [
        reference_gast_gradients(before, mb, settings, sup, seed)
        for mb, sup, seed in zip(micro, supports, seen["seeds"])
    ]
    names = {id(p): n for n, p in before.named_parameters()}
    expected_grad = {names[key]: (refs[0][key] + refs[1][key]) / 2 for key in refs[0]}
    after = trainable(model)
    assert set(expected_grad) == set(after)
    for name, grad in expected_grad.items():
        expected = before.get_parameter(name).detach() - LR * grad
        torch.testing.assert_close(after[name], expected, rtol=1e-5, atol=1e-6)

    # Clipping really was off, and the logged norm is that of the reference gradient.
    assert not clipped
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected_grad.values()]))
    assert trainer.state.log_history[0]["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)

    # Selection mattered: the dense mean gradient would have moved the parameters elsewhere.
    dense = _dense_mean_grads(before, micro)
    assert any(not torch.allclose(dense[n], g, atol=1e-5) for n, g in expected_grad.items())


def _dense_mean_grads(model, batches) -> dict[str, torch.Tensor]:
    """The plain mean over micro-batches of ∇ mean_i ℓ(x_i) (what dense LoRA steps on)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in named}
    for batch in batches:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = per_sample_loss(out.logits, batch["labels"]).mean()
        for (n, _), g in zip(named, torch.autograd.grad(loss, [p for _, p in named])):
            total[n] += g / len(batches)
    return total


# ---------------------------------------------------------------- (b) dense LoRA
def test_dense_lora_is_the_plain_mean_and_accumulation_is_equivalent():
    runs = {}
    for batch_size, accumulation in [(8, 1), (4, 2)]:
        model, collator = lora_model(), RecordingCollator()
        before = copy.deepcopy(model)
        args = config(
            method="lora", per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation
        )
        GastuneTrainer(model=model, args=args, train_dataset=row_dataset(), data_collator=collator).train()
        runs[batch_size] = (before, trainable(model), collator.batches)

    before, big, batches = runs[8]
    _, small, small_batches = runs[4]
    # Same sampler seed: the 8-row batch is exactly the two 4-row micro-batches.
    assert torch.equal(batches[0]["index"], torch.cat([b["index"] for b in small_batches[:2]]))
    grads = _dense_mean_grads(before, batches[:1])
    for name, value in big.items():
        expected = before.get_parameter(name).detach() - LR * grads[name]
        assert not torch.equal(value, before.get_parameter(name)), f"{name} did not move"
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(small[name], value, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- (c) statistics in the logs
def _gast_logs(trainer) -> list[dict]:
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(all(k in h for k in GAST_KEYS) for h in logs), logs
    return logs


def test_softmax_selection_statistics_are_logged():
    steps = 12
    args = config(method="gast", gast_k=2, gast_support_size=2, max_steps=steps)
    trainer = GastuneTrainer(
        model=lora_model(3), args=args, train_dataset=row_dataset(), data_collator=RecordingCollator()
    )
    trainer.train()
    logs = _gast_logs(trainer)
    assert len(logs) == steps
    for h in logs:
        assert abs(h["gast/alignment_all"]) < 1e-9  # standardised scores average to 0
        assert 0.0 <= h["gast/negative_pick_frac"] <= 1.0
        assert 0.0 <= h["gast/unused_frac"] <= 1.0
        assert h["gast/usage_cv"] >= 0.0
    # softmax favours aligned samples: on average the chosen ones score above the mean.
    chosen = sum(h["gast/alignment_chosen"] for h in logs) / steps
    assert chosen > 0.2, chosen

    # usage_cv / unused_frac are those of the kept masks (one micro-batch per step here).
    masks = trainer.method.masks
    assert [step for step, _ in masks] == list(range(steps))
    for (_, mask), h in zip(masks, logs):
        assert mask.shape == (4, 3) and (mask.sum(dim=0) == 2).all()
        usage = mask.sum(dim=1).double()
        assert h["gast/usage_cv"] == pytest.approx((usage.std(unbiased=False) / usage.mean()).item())
        assert h["gast/unused_frac"] == pytest.approx((usage == 0).double().mean().item())


def _z(scores: list[float]) -> torch.Tensor:
    s = torch.tensor(scores, dtype=torch.float64)
    return (s - s.mean()) / s.std(unbiased=False)


def test_topk_alignment_chosen_is_the_maximum_possible(monkeypatch):
    steps = 4
    args = config(method="gast", gast_k=2, gast_selection="topk", gast_support_size=2, max_steps=steps)
    trainer = GastuneTrainer(
        model=lora_model(), args=args, train_dataset=row_dataset(), data_collator=RecordingCollator()
    )
    seen = record_steps(trainer, monkeypatch)
    trainer.train()
    logs = _gast_logs(trainer)
    for records, h in zip(seen["records"], logs):
        # the mean standardised score of the 2 best samples of each group: no choice scores higher
        best = [_z(r.scores).topk(2).values.mean().item() for r in records]
        assert h["gast/alignment_chosen"] == pytest.approx(sum(best) / len(best), rel=1e-6)
        negatives = sum(int((torch.tensor(r.scores)[r.chosen] < 0).sum()) for r in records)
        assert h["gast/negative_pick_frac"] == pytest.approx(negatives / (2 * len(records)))


# ---------------------------------------------------------------- (d) trl's SFTTrainer
def test_gast_with_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from gastune.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    base = tiny_llama_for(
        tokenizer,
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg = build_peft_config(base, r=2, alpha=4, dropout=0.0)
    cfg.init_lora_weights = False
    model = get_peft_model(base, cfg)
    before = trainable(model)
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(12)]

    class GastSFTTrainer(GastuneMixin, trl.SFTTrainer):
        pass

    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        optim="sgd",
        learning_rate=LR,
        max_grad_norm=0.0,
        per_device_train_batch_size=4,
        max_steps=3,
        logging_steps=1,
        max_length=32,
        disable_tqdm=True,
    )
    labels_seen = []
    method = GastMethod(GastSettings(k=2), support_size=2, support="train")
    step = method.training_step

    def recording_step(trainer_, model_, inputs, run):
        labels_seen.append((inputs["input_ids"], inputs["labels"]))
        return step(trainer_, model_, inputs, run)

    method.training_step = recording_step
    trainer = GastSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        method=method,
    )
    trainer.train()

    logs = _gast_logs(trainer)
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    # prompt/completion data: trl masks the prompt, so only completion tokens carry a target.
    ids, labels = labels_seen[0]
    assert ((labels == -100) & (ids != tokenizer.pad_token_id)).any()
    after = trainable(model)
    assert all("layers." in n for n in after)
    unchanged = [n for n in after if torch.equal(after[n], before[n])]
    assert not unchanged, f"adapter tensors not trained: {unchanged}"


# ---------------------------------------------------------------- (e) bad input
@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(gast_k=8), "exceeds the batch size"),
        (dict(gast_support_size=0), "K_sup"),
        (dict(gast_temperature=0.0), "temperature"),
        (dict(gast_temperature=-1.0), "temperature"),
    ],
)
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(GastuneError, match=message):
        config(method="gast", **overrides)


def test_bad_support_set_is_rejected():
    def build(**kwargs):
        return GastuneTrainer(
            model=lora_model(),
            args=config(method="gast", gast_support="heldout", gast_k=2),
            train_dataset=row_dataset(),
            data_collator=RecordingCollator(),
            **kwargs,
        )

    with pytest.raises(GastuneError, match=r"heldout.*support dataset"):
        build()
    with pytest.raises(GastuneError, match="support set is empty"):
        build(support_dataset=[])


def test_explicit_method_with_k_above_the_batch_fails_before_any_update():
    model = lora_model()
    before = trainable(model)
    trainer = GastuneTrainer(
        model=model,
        args=config(method="gast"),
        train_dataset=row_dataset(),
        data_collator=RecordingCollator(),
        method=GastMethod(GastSettings(k=8), support="batch"),
    )
    with pytest.raises(GastuneError, match="exceeds the micro-batch size 4"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in trainable(model).items())


def test_partial_last_batch_does_not_stop_training():
    """10 rows in batches of 4: the last micro-batch has 2 rows and keeps the same fraction (k=2 of 4 → 1 of 2)."""
    args = config(method="gast", gast_k=2, dataloader_drop_last=False, max_steps=-1, num_train_epochs=1)
    trainer = GastuneTrainer(
        model=lora_model(), args=args, train_dataset=row_dataset(10), data_collator=RecordingCollator()
    )
    trainer.train()
    sizes = [(mask.shape[0], mask.sum(dim=0).tolist()) for _, mask in trainer.method.masks]
    assert [n for n, _ in sizes] == [4, 4, 2]
    assert all(set(per_layer) == {2} for _, per_layer in sizes[:2])
    assert set(sizes[2][1]) == {1}


def test_support_from_a_dataset_with_a_text_column():
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq

    from gastune.models import load_tokenizer

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        ids = torch.randint(3, 100, (4 + i % 3,), generator=g).tolist()  # ragged, as tokenized text is
        rows.append({"text": f"row {i}", "input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
    args = config(method="gast", gast_k=2, gast_support_size=2, remove_unused_columns=True)
    collator = DataCollatorForSeq2Seq(load_tokenizer("smollm2-135m"))
    model = lora_model()
    before = {n: p.detach().clone() for n, p in trainable(model).items()}
    trainer = GastuneTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collator
    )
    trainer.train()
    assert trainer.method.masks, "no GAST step ran"
    assert all(not torch.equal(p, before[n]) for n, p in trainable(model).items() if ".layers." in n)
