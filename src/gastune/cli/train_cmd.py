"""``gastune train``: fine-tune with any method; every TrainingArguments flag works.

Examples:
    gastune train --method gast --per_task 100 --max_steps 50 --output_dir runs/gast
    gastune train --config configs/gast.yaml --learning_rate 1e-4

``--help`` prints gastune's options first, then the Trainer's (``gastune.cli.train_help``).
"""

from __future__ import annotations

from pathlib import Path

# What peft's save_pretrained writes: the config, and the weights in one of two formats.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a causal LM with GAST, a baseline or dense LoRA (--config FILE.yaml, any Trainer flag)",
        add_help=False,  # --help is gastune.cli.train_help's, printed by run()
    )
    p.set_defaults(run=run, passthrough=True)


def check_adapter_written(output_dir: str) -> None:
    """Fail if training ended without an adapter on disk.

    ``Trainer.save_model`` can return without writing one: under FSDP with
    ``fsdp_state_dict_type: SHARDED_STATE_DICT`` transformers saves no adapter at all, silently.
    """
    from gastune.errors import GastuneError
    from gastune.tuners.bottleneck_io import CONFIG_NAME, WEIGHTS_NAME

    out = Path(output_dir)
    if (out / CONFIG_NAME).is_file() and (out / WEIGHTS_NAME).is_file():
        return  # a series/parallel adapter (gastune.tuners)
    missing = [ADAPTER_CONFIG] if not (out / ADAPTER_CONFIG).is_file() else []
    if not any((out / name).is_file() for name in ADAPTER_WEIGHTS):
        missing.append(ADAPTER_WEIGHTS[0])
    if missing:
        raise GastuneError(
            f"training finished but no adapter was written to {out} (missing {', '.join(missing)}); "
            "under FSDP use fsdp_state_dict_type: FULL_STATE_DICT (configs/fsdp/fsdp2_lora.yaml)"
        )


def run(args) -> int:
    from gastune.cli.config_args import parse_train_args
    from gastune.training.run import train

    if "-h" in args.argv or "--help" in args.argv:
        from gastune.cli.train_help import train_help_parser

        print(train_help_parser().format_help())
        return 0
    model_cfg, data_cfg, config = parse_train_args(args.argv)
    result = train(model_cfg, data_cfg, config)
    if result.trainer.is_world_process_zero():  # one line for the run, not one per rank
        check_adapter_written(config.output_dir)
        finished = result.metrics.get("already_finished_at_step")
        if finished is not None:  # a resume of a run that had finished: nothing was trained
            print(f"the run in {config.output_dir} had already finished at step {finished}; nothing trained")
            return 0
        print(
            f"saved the {config.method} adapter to {config.output_dir}; train loss {result.metrics.get('train_loss', float('nan')):.4f}"
        )
    return 0
