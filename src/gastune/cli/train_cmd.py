"""``gastune train``: fine-tune with any method; every TrainingArguments flag works.

Examples:
    gastune train --method gast --per_task 100 --max_steps 50 --output_dir runs/gast
    gastune train --config configs/gast.yaml --learning_rate 1e-4
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a causal LM (any Trainer flag; --config FILE.yaml)",
        add_help=False,
        description=__doc__,
    )
    p.set_defaults(run=run, passthrough=True)


def run(args) -> int:
    from gastune.cli.config_args import parse_train_args
    from gastune.training.run import train

    model_cfg, data_cfg, config = parse_train_args(args.argv)
    result = train(model_cfg, data_cfg, config)
    if result.trainer.is_world_process_zero():  # one line for the run, not one per rank
        print(
            f"saved the {config.method} adapter to {config.output_dir}; train loss {result.metrics.get('train_loss', float('nan')):.4f}"
        )
    return 0
