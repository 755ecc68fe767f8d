"""The fine-tuned student writes a rationale for every user: through a served endpoint or in-process.

Both backends write the teacher's record format, keyed by a label naming the adapter and its hash,
so a retrained adapter gets fresh records and the two backends resume each other's runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from eval.errors import InputError
from eval.io import file_hash

from .client import ClientConfig
from .prompts import STUDENT
from .rationales import RationaleConfig, run_generation


def _student_defaults() -> RationaleConfig:
    return RationaleConfig(template=STUDENT, client=ClientConfig(max_tokens=96, temperature=0.0, timeout_s=900.0))


@dataclass
class StudentConfig:
    adapter: str = ""
    base_model: str | None = None    # default: the base the adapter was trained on
    backend: str = "local"           # local (batched model.generate) | endpoint (OpenAI-compatible server)
    base_url: str | None = None      # endpoint already serving the student; None: start `slim serve` for the run
    batch_size: int = 16             # local backend
    rationale: RationaleConfig = field(default_factory=_student_defaults)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def student_label(adapter: str | Path) -> str:
    return f"student:{Path(adapter).name}:{file_hash(adapter)[:12]}"


def generate_student(data_dir: str | Path, out_dir: str | Path, cfg: StudentConfig) -> dict[str, Any]:
    """Student rationales for every user (or `cfg.rationale.users`), resumable, same records as the teacher."""
    from .local import LocalGenerator
    from .serve import endpoint

    if not (Path(cfg.adapter) / "adapter_config.json").exists():
        raise InputError(f"{cfg.adapter}: not a LoRA adapter folder (run slim finetune-student)")
    label, client = student_label(cfg.adapter), cfg.rationale.client
    if cfg.backend == "local":
        gen = LocalGenerator(cfg.base_model, cfg.adapter, cfg.batch_size, client.max_tokens, client.temperature,
                             cfg.rationale.seed)
        return run_generation(data_dir, out_dir, cfg.rationale, gen, label, stage="generate")
    if cfg.backend != "endpoint":
        raise InputError(f"unknown generation backend '{cfg.backend}' (choose local or endpoint)")
    own = cfg.base_url is None  # no endpoint given: serve base + adapter for the run
    client = replace(client, base_url=cfg.base_url or client.base_url)
    with endpoint(client, cfg.base_model if own else None, cfg.adapter if own else None,
                  Path(out_dir) / "server.log") as chat:
        return run_generation(data_dir, out_dir, cfg.rationale, chat, label, stage="generate")
