"""LoRA adapters as plain models: merged in memory (in-process generation) or on disk (serving).

vLLM on CPU serves a merged copy (LoRA forces its slow kernels there); on a GPU it loads the adapter
itself, and the transformers paths merge it in memory.
"""
from __future__ import annotations

from pathlib import Path

from eval.errors import InputError
from eval.io import atomic_dir, file_hash, read_json, write_json


def adapter_base(adapter: str | Path, base: str | Path | None = None) -> str:
    """The base model path of an adapter: given explicitly, or the one it was trained on."""
    cfg = Path(adapter) / "adapter_config.json"
    if not cfg.exists():
        raise InputError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    return str(base or read_json(cfg)["base_model_name_or_path"])


def load_causal_lm(path: str | Path):
    """A float32 causal LM. A leftover GGUF `quantization_config` (the cached SmolLM2's weights are
    plain float32) is dropped, since transformers refuses to train a model that claims it is quantized."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    quant = getattr(config, "quantization_config", None)
    if quant is not None and dict(quant).get("quant_method") == "gguf":
        delattr(config, "quantization_config")
    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)


def load_merged(adapter: str | Path, base: str | Path | None = None):
    """(model, tokenizer) with the adapter's weights merged into the base."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base = adapter_base(adapter, base)
    model = PeftModel.from_pretrained(load_causal_lm(base), str(adapter)).merge_and_unload()
    return model, AutoTokenizer.from_pretrained(adapter if (Path(adapter) / "tokenizer_config.json").exists() else base)


def merged_dir(adapter: str | Path, base: str | Path | None = None) -> Path:
    """A model folder `<adapter>-merged` equal to base + adapter, rebuilt only when the adapter changes."""
    adapter = Path(adapter)
    out = adapter.with_name(adapter.name + "-merged")
    stamp = {"adapter": str(adapter), "adapter_sha256": file_hash(adapter), "base": adapter_base(adapter, base)}
    if (out / "merged_from.json").exists() and read_json(out / "merged_from.json") == stamp:
        return out
    model, tok = load_merged(adapter, base)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "merged_from.json", stamp)
    return out
