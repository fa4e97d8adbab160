"""``gastune export``: an adapter as a folder other tools load without gastune.

Without ``--merge`` the result is a clean peft folder: the adapter's config (with a portable
``base_model_name_or_path``) and weights, the tokenizer and ``gastune_config.json``; no
``training_args.bin`` (a pickle) and no checkpoints. With ``--merge`` the adapter is folded
into the base model's weights and the result is a standard model folder (config,
``model.safetensors``, tokenizer) that plain transformers loads:

    gastune export --adapter runs/demo/gast --out exported/gast-merged --merge
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('exported/gast-merged')"

The base model is the one the adapter records (``gastune_config.json``), or ``--model``.
The embedded default base is SmolLM2-135M-Instruct de-quantised from its Q4_1 GGUF, not the
hub's bf16 weights: a peft folder applied to the hub checkpoint gives close but not equal
outputs; a merged folder carries the exact weights it was trained on.

A series/parallel adapter (``gastune.tuners``) exports as its own folder (gastune loads it,
peft does not); ``--merge`` folds it in exactly when its non-linearity is ``identity`` and is
refused otherwise (a tanh adapter is not linear in its input).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from gastune.errors import GastuneError

# Files of a training output folder that belong in a clean peft folder (the tokenizer's
# files are written anew by save_pretrained).
_PEFT_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "gastune_config.json",
    "README.md",
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write an adapter as a clean peft folder, or merged into a plain transformers model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--adapter", required=True, help="the adapter folder (gastune train's output_dir)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    p.add_argument(
        "--merge", action="store_true", help="fold the adapter into the base weights: a plain model folder"
    )
    p.add_argument("--model", default=None, help="the base model (default: the one the adapter records)")
    p.set_defaults(run=run)


def recorded_base(adapter: Path) -> str | None:
    """The base model name the adapter was trained on, from ``gastune_config.json``."""
    try:
        settings = json.loads((adapter / "gastune_config.json").read_text())
    except (OSError, ValueError):
        return None
    base = settings.get("base_model") or {}
    return base.get("name") or (settings.get("model") or {}).get("model")


def _check_folders(adapter: Path, out: Path) -> None:
    from gastune.tuners import is_bottleneck_folder

    if not is_bottleneck_folder(adapter):  # else gastune's own series/parallel adapter
        if not (adapter / "adapter_config.json").is_file():
            raise GastuneError(f"'{adapter}' is not a peft adapter folder (no adapter_config.json)")
        if not any((adapter / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            raise GastuneError(f"'{adapter}' holds no adapter weights (adapter_model.safetensors)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GastuneError(f"'{out}' exists and is not an empty folder; choose a new --out")
    if out.resolve() == adapter.resolve():
        raise GastuneError("--out must differ from --adapter")


def export_adapter(
    adapter: str | Path, out: str | Path, merge: bool = False, model: str | None = None
) -> Path:
    """Write ``adapter`` as a clean peft folder, or merged into its base, to ``out``.

    The folder is written under a temporary name and renamed at the end, so a failed export
    leaves nothing that looks complete.
    """
    from gastune.models import load_model, load_tokenizer
    from gastune.models.portable import describe_base, make_portable
    from gastune.tuners import is_bottleneck_folder, load_bottleneck, merge_bottleneck
    from gastune.tuners.bottleneck_io import FILES as BOTTLENECK_FILES

    adapter, out = Path(adapter), Path(out)
    _check_folders(adapter, out)
    base = model or recorded_base(adapter)
    if base is None:
        raise GastuneError(f"'{adapter}' records no base model (no gastune_config.json): pass --model")
    tmp = out.with_name(f".{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # The tokenizer saved with the adapter is the one it was trained with (pad token set).
        has_own = (adapter / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(str(adapter) if has_own else base)
        if merge and is_bottleneck_folder(adapter):
            # exact only for an identity non-linearity; merge_bottleneck refuses the others
            merged = merge_bottleneck(load_bottleneck(load_model(base), adapter))
            merged.save_pretrained(tmp)
            (tmp / "gastune_export.json").write_text(
                json.dumps({"merged_from": str(adapter), "base_model": describe_base(base)}, indent=2) + "\n"
            )
        elif merge:
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(load_model(base), str(adapter))
            if not hasattr(peft_model, "merge_and_unload"):
                raise GastuneError(
                    f"a {peft_model.peft_config['default'].peft_type} adapter cannot be merged"
                )
            try:
                merged = peft_model.merge_and_unload()
            except (AttributeError, NotImplementedError, ValueError) as exc:
                raise GastuneError(f"cannot merge this adapter: {exc}") from exc
            merged.save_pretrained(tmp)
            (tmp / "gastune_export.json").write_text(
                json.dumps({"merged_from": str(adapter), "base_model": describe_base(base)}, indent=2) + "\n"
            )
        else:
            for name in (*_PEFT_FILES, *BOTTLENECK_FILES):
                if (adapter / name).is_file():
                    shutil.copyfile(adapter / name, tmp / name)
        tokenizer.save_pretrained(tmp)
        make_portable(tmp, base)  # portable base name, ordinary file modes
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def run(args) -> int:
    out = export_adapter(args.adapter, args.out, merge=args.merge, model=args.model)
    kind = "merged model (load with AutoModelForCausalLM)" if args.merge else "peft adapter"
    print(f"wrote {kind} to {out}")
    return 0
