"""The fine-tuned student writes a rationale for every user: through a served endpoint or in-process.

Both backends write the teacher's record format, keyed by a label naming the adapter and its
fingerprint, so a retrained adapter gets fresh records and the two backends resume each other's runs.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.config import setting
from eval.errors import InputError
from eval.stage import fingerprint

from .client import ClientConfig
from .finetune import SlimStudentStage
from .prompts import STUDENT
from .rationales import GenerationConfig, RationaleStage, remaining_jobs, run_generation
from .records import check_cuts, cuts_setting

BACKENDS = ("local", "endpoint")


@dataclass(frozen=True)
class StudentRationalesConfig(GenerationConfig):
    template: str = setting(STUDENT, "Prompt version in prompts/, or a template file (the fine-tuning one).")
    client: ClientConfig = setting(factory=lambda: ClientConfig(base_url="", max_tokens=96, temperature=0.0,
                                                                timeout_s=900.0))
    backend: str = setting("local", "local (in-process: vLLM or batched transformers generate, see engine) | "
                                    "endpoint (OpenAI-compatible server: client.base_url, or the adapter served "
                                    "for the run when empty).")
    base_model: str | None = setting(None, "Base model folder (none: the one the adapter was trained on).")
    batch_size: int = setting(16, "Users per batch (local backend, transformers engine; vLLM batches itself).")
    cuts: int = cuts_setting()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_cuts(self.cuts, "slim-student-rationales")
        if self.backend not in BACKENDS:
            raise InputError(f"unknown generation backend '{self.backend}' (choose {' or '.join(BACKENDS)})")
        self.check_served(self.backend == "local" or not self.client.urls, "served or loaded")


def student_label(adapter: Path) -> str:
    return f"student:{adapter.name}:{fingerprint(adapter)[:12]}"


class StudentRationalesStage(RationaleStage):
    """The SLIM student's rationales for every user (or a seeded sample), in the teacher's record
    format; writes RUN/slim-student-rationales, append-only: a rerun resumes."""

    name = "slim-student-rationales"
    config_class = StudentRationalesConfig

    @property
    def adapter(self) -> Path:
        return self.run / SlimStudentStage.name

    def inputs(self) -> dict[str, Path]:
        return {**super().inputs(), "adapter": self.adapter}

    def digest(self, out: Path, counts: dict[str, Any]) -> str:
        """The records, and `cuts` when above 1: the records may be kept as they are when only `cuts`
        changes, but which of them the vectors stage encodes changes with it."""
        records, cuts = super().digest(out, counts), self.config.cuts
        return records if cuts == 1 else hashlib.sha256(f"{records}:cuts={cuts}".encode()).hexdigest()

    def build(self, out: Path) -> dict[str, Any]:
        from .engine import parallel_engine
        from .local import make_generator
        from .serve import endpoint

        cfg, label = self.config, student_label(self.adapter)
        todo = remaining_jobs(self.data_dir, out, cfg, label, cfg.cuts)
        if not todo:  # every record is there: start no model
            return {**run_generation(self.data_dir, out, cfg, None, label, self.name, cfg.cuts), "engine": "none"}
        engine = parallel_engine(cfg.engine, cfg.data_parallel_size, cfg.tensor_parallel_size)
        if cfg.backend == "local":
            parallel = {"data_parallel_size": cfg.data_parallel_size,
                        "tensor_parallel_size": cfg.tensor_parallel_size} if cfg.parallel else {}
            with make_generator(cfg.base_model, self.adapter, cfg.batch_size, cfg.client.max_tokens,
                                cfg.client.temperature, cfg.seed, engine=engine, prompts=len(todo), **parallel) as gen:
                summary = run_generation(self.data_dir, out, cfg, gen, label, self.name, cfg.cuts)
                return {**summary, "engine": gen.engine}
        own = not cfg.client.urls  # no endpoint given: serve base + adapter for the run
        with endpoint(cfg.client, cfg.base_model if own else None, self.adapter if own else None,
                      out / "server.log", engine=cfg.engine, data_parallel_size=cfg.data_parallel_size,
                      tensor_parallel_size=cfg.tensor_parallel_size) as (chat, served_by):
            return {**run_generation(self.data_dir, out, cfg, chat, label, self.name, cfg.cuts), "engine": served_by}
