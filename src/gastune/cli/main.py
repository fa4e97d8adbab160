"""``gastune`` command line: one subcommand per module in ``gastune.cli``.

Each subcommand module exposes ``add_parser(subparsers)`` and ``run(args) -> int``; heavy
imports happen inside ``run`` so ``gastune --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gastune.errors import GastuneError

# subcommand name -> module under gastune.cli
SUBCOMMANDS = {
    "train": "train_cmd",
    "eval": "eval_cmd",
    "data": "data_cmd",
    "demo": "demo_cmd",
    "bench": "bench_cmd",
    "export": "export_cmd",
    "lm-eval": "lm_eval_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gastune",
        description="Sparse parameter-efficient fine-tuning of causal LMs: GAST and its baselines.",
        epilog="Run 'gastune COMMAND --help' for a command's options.",
    )
    from gastune import __version__

    parser.add_argument("--version", action="version", version=f"gastune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(f"gastune.cli.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"gastune.cli.{module_name}":
                raise
            continue  # subcommand not built yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    # Pass-through subcommands (train) hand their flags to HfArgumentParser unparsed.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = extra
    try:
        return int(args.run(args) or 0)
    except GastuneError as exc:
        message = " ".join(str(exc).split("\n"))  # one line, even when it quotes a user's newline
        print(f"gastune {args.command}: error: {message}", file=sys.stderr)
        return exc.exit_code  # 2: refused input or setting; 3: training failed (errors.py)
    except KeyboardInterrupt:
        print(f"gastune {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        close_process_group()


def close_process_group() -> None:
    """Tear a distributed run's process group down before the interpreter exits, as torch asks.

    Left to exit, gloo's threads can abort a rank whose run had finished and saved
    ("terminate called without an active exception", exit -6): a finished run must not look
    like a failed one.
    """
    if "torch" not in sys.modules:  # nothing distributed ran (e.g. `gastune --help`)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
