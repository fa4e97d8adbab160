"""The training entry point shared by the Python API and ``gastune train``.

Example:
    >>> from gastune.training import DataConfig, GastuneConfig, ModelConfig
    >>> from gastune.training.run import train
    >>> result = train(ModelConfig(), DataConfig(per_task=20),  # doctest: +SKIP
    ...                GastuneConfig(method="gast", max_steps=10, per_device_train_batch_size=8))
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import set_seed

from gastune.errors import GastuneError
from gastune.models import find_decoder_blocks, load_model, load_tokenizer
from gastune.models.portable import describe_base, make_portable
from gastune.models.quantization import keep_cpu_weights_unpacked, quantization_config
from gastune.training import checkpoint
from gastune.training.adapters import BOTTLENECK_TUNERS, apply_adapter
from gastune.training.config import DataConfig, GastuneConfig, ModelConfig
from gastune.training.output_dir import prepare_output_dir
from gastune.training.trainer import GastuneTrainer

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    trainer: GastuneTrainer
    model: object
    tokenizer: object
    metrics: dict


def resolve_tuner(model_cfg: ModelConfig, method: str) -> str:
    """``--method dora`` means dense DoRA; otherwise the tuner defaults to LoRA."""
    if method in ("lora", "dora"):
        if model_cfg.tuner not in (None, method):
            raise GastuneError(
                f"--method {method} trains a dense {method} adapter; it conflicts with --tuner {model_cfg.tuner}"
            )
        return method
    return model_cfg.tuner or "lora"


def load_training_records(
    data_cfg: DataConfig, split: str = "train", source: str | None = None
) -> list[dict]:
    """Records from the commonsense mixture or a user file/folder."""
    training = source is None  # label noise applies to the training data, never to a support set
    source = source or data_cfg.data
    if training and data_cfg.label_noise and source != "commonsense":
        raise GastuneError("label_noise corrupts the commonsense records: it needs --data commonsense")
    if source == "commonsense-heldout":
        return _heldout_records(data_cfg)
    if source in ("commonsense", "commonsense-validation"):
        from gastune.data import load_commonsense

        split = "validation" if source == "commonsense-validation" else split
        records = load_commonsense(
            split,
            tasks=data_cfg.tasks,
            per_task=data_cfg.per_task,
            seed=data_cfg.data_seed_value,
            prompt_format=data_cfg.prompt_format,
        )
        if training and data_cfg.label_noise:
            from gastune.data.noise import corrupt_labels

            records = corrupt_labels(records, data_cfg.label_noise, seed=data_cfg.data_seed_value)
        return records
    from gastune.data import load_records

    return load_records(source)


def _heldout_records(data_cfg: DataConfig) -> list[dict]:
    """Train-split records that follow the training sample in each task's seeded order.

    Disjoint from the training sample (same ``data_seed_value``), clean, and never evaluation
    questions (those come from the validation split).
    """
    from gastune.data import load_commonsense

    if data_cfg.data != "commonsense" or data_cfg.per_task is None:
        raise GastuneError(
            "support_data=commonsense-heldout needs --data commonsense with --per_task "
            "(the held-out part follows the training sample)"
        )
    return load_commonsense(
        "train",
        tasks=data_cfg.tasks,
        per_task=data_cfg.support_per_task,
        seed=data_cfg.data_seed_value,
        prompt_format=data_cfg.prompt_format,
        skip_per_task=data_cfg.per_task,
    )


def build_dataset(records: list[dict], tokenizer, data_cfg: DataConfig):
    from gastune.data import TokenizedDataset

    return TokenizedDataset.from_records(
        records,
        tokenizer,
        cutoff_len=data_cfg.cutoff_len,
        train_on_prompt=data_cfg.train_on_prompt,
        chat_loss=data_cfg.chat_loss,
    )


def load_base_model(model_cfg: ModelConfig, config: GastuneConfig):
    """The base model, quantised with bitsandbytes under ``--load_in_4bit``/``--load_in_8bit``
    (QLoRA), on this process's device."""
    quant = quantization_config(
        model_cfg.load_in_4bit, model_cfg.load_in_8bit, torch.bfloat16 if config.bf16 else torch.float32
    )
    if quant is None:
        return load_model(model_cfg.model)
    # Quantisation happens while loading, on the device the weights are loaded to: this rank's.
    model = load_model(model_cfg.model, quantization_config=quant, device_map={"": config.device})
    from peft import prepare_model_for_kbit_training

    # Freezes the base, keeps norms and other small tensors in fp32; gradient checkpointing stays
    # the Trainer's choice (--gradient_checkpointing).
    keep_cpu_weights_unpacked(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def train(
    model_cfg: ModelConfig, data_cfg: DataConfig, config: GastuneConfig, callbacks: list | None = None
) -> TrainResult:
    """Load the model, add the adapter, build the data, train with ``config.method``, save.

    The adapter is saved the standard peft way in ``config.output_dir`` (loadable with
    ``PeftModel.from_pretrained``) — a series/parallel adapter as ``gastune.tuners`` saves it
    (``load_bottleneck``) — with the tokenizer and ``gastune_config.json``.
    """
    from gastune.data import CausalLMCollator
    from gastune.data.prompts import default_rule

    tuner = resolve_tuner(model_cfg, config.method)
    if config.gast_support == "heldout" and not data_cfg.support_data and config.method.startswith("gast"):
        raise GastuneError(
            "gast_support=heldout needs --support_data (a file, folder, 'commonsense-validation' "
            "or 'commonsense-heldout')"
        )
    # Before anything heavy: the output folder, and the checkpoint a resume would use
    # (docs/reliability.md).
    resume = checkpoint.resolve_resume(config.resume_from_checkpoint, config.output_dir)
    prepare_output_dir(
        config.output_dir,
        model_cfg.model,
        resume=resume is not None,
        overwrite=config.overwrite_output_dir,
        main=config.process_index == 0,
    )
    tokenizer = load_tokenizer(model_cfg.model)
    records = load_training_records(data_cfg)
    dataset = build_dataset(records, tokenizer, data_cfg)
    if len(dataset) == 0:
        raise GastuneError(f"the training data '{data_cfg.data}' is empty")
    batch = config.per_device_train_batch_size * config.world_size
    if config.dataloader_drop_last and len(dataset) < batch:  # the Trainer would fail deep inside
        raise GastuneError(
            f"{len(dataset)} training sequences make no full batch of {batch} with dataloader_drop_last: "
            "no optimizer step would run"
        )
    support = None
    if data_cfg.support_data:
        support = build_dataset(
            load_training_records(data_cfg, source=data_cfg.support_data), tokenizer, data_cfg
        )
    # Seed before the adapter is created: its initialisation (LoRA's A) must follow --seed too.
    set_seed(config.seed)
    model = load_base_model(model_cfg, config)
    find_decoder_blocks(model)  # fail early, with a clear message, on a model without decoder layers
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:  # otherwise an IndexError deep in the embedding lookup
        raise GastuneError(
            f"the tokenizer of '{model_cfg.model}' has {len(tokenizer)} tokens but the model's embedding "
            f"has only {vocab} rows: the tokenizer does not belong to this model"
        )
    if tuner in BOTTLENECK_TUNERS:
        model = apply_adapter(model, tuner=tuner, **model_cfg.bottleneck_settings())
    else:
        model = apply_adapter(
            model,
            tuner=tuner,
            r=model_cfg.lora_r,
            alpha=model_cfg.lora_alpha,
            dropout=model_cfg.lora_dropout,
            target_modules=model_cfg.target_modules,
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "method %s, tuner %s: %d trainable parameters, %d training sequences",
        config.method,
        tuner,
        trainable,
        len(dataset),
    )
    trainer = GastuneTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        data_collator=CausalLMCollator(tokenizer),
        support_dataset=support,
        callbacks=callbacks,
    )
    output = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)
        settings = {
            "model": asdict(model_cfg),
            "data": asdict(data_cfg),
            "tuner": tuner,
            "method": config.method,
            "base_model": describe_base(model_cfg.model),
            # How to score this adapter: `gastune eval` reads these unless told otherwise.
            "eval": {"format": data_cfg.prompt_format, "rule": default_rule(data_cfg.prompt_format)},
        }
        settings["training"] = json.loads(config.to_json_string())
        (Path(config.output_dir) / "gastune_config.json").write_text(
            json.dumps(settings, indent=2, default=str)
        )
        make_portable(config.output_dir, model_cfg.model)
    return TrainResult(trainer=trainer, model=model, tokenizer=tokenizer, metrics=dict(output.metrics))
