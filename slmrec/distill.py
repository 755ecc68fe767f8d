"""SLMRec's layer-wise distillation: a shallow student aligned block by block with a deep teacher.

With B blocks, the student's hidden state after layer i*N_s/B is aligned with the teacher's after
layer i*N_t/B (i = 1..B), at the last position, by a cosine loss and an L2 feature loss; extra heads
on the student's intermediate blocks each predict the next item with their own cross-entropy.

The reference code hid its distillation loss behind a bare `except` with defaults that turned it
off. Here every weighted term is checked to be present at every step, a term that needs a teacher
refuses to run without one, and each term is reported separately in the training log.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eval.config import setting
from eval.errors import InputError

from .llm import LLMRec

MODES = ("offline", "online")


@dataclass(frozen=True)
class DistillConfig:
    blocks: int = setting(4, "Blocks B: hidden states aligned after every N_teacher/B and N_student/B layers.")
    lambda_cos: float = setting(1.0, "Weight of 1 - cos(student, teacher) per block (0 = off).")
    lambda_norm: float = setting(0.1, "Weight of ||student - teacher||_2 per block (0 = off).")
    lambda_ms: float = setting(1.0, "Weight of the extra heads' cross-entropy on the student's intermediate "
                                    "blocks (0 = off).")
    mode: str = setting("offline", "offline: a trained teacher, frozen; online: a teacher trained alongside.")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"distill mode '{self.mode}' is not one of {', '.join(MODES)}")
        if self.blocks < 1:
            raise InputError(f"blocks must be at least 1, got {self.blocks}")
        for name in ("lambda_cos", "lambda_norm", "lambda_ms"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must not be negative, got {getattr(self, name)}")

    @property
    def weights(self) -> dict[str, float]:
        """The loss terms this configuration turns on, with their weights."""
        w = {"ce": 1.0, "cos": self.lambda_cos, "norm": self.lambda_norm, "ms": self.lambda_ms}
        if self.mode == "online":
            w["teacher_ce"] = 1.0
        return {k: v for k, v in w.items() if v > 0}

    @property
    def needs_teacher(self) -> bool:
        return self.mode == "online" or self.lambda_cos > 0 or self.lambda_norm > 0


def block_pairs(teacher_layers: int, student_layers: int, blocks: int) -> list[tuple[int, int]]:
    """(teacher layer, student layer) after which hidden states are aligned, one pair per block."""
    for who, n in (("teacher", teacher_layers), ("student", student_layers)):
        if n % blocks:
            raise InputError(f"{who} has {n} layers, not divisible into {blocks} blocks")
    return [(i * teacher_layers // blocks, i * student_layers // blocks) for i in range(1, blocks + 1)]


def student_aux_layers(student_layers: int, blocks: int) -> list[int]:
    """The student's intermediate block ends (the last block uses the model's own head)."""
    return [s for _, s in block_pairs(student_layers, student_layers, blocks)][:-1]


class Distiller(nn.Module):
    """Student + teacher; forward returns the weighted loss and each term (for the training log)."""

    def __init__(self, student: LLMRec, teacher: LLMRec | None, cfg: DistillConfig):
        super().__init__()
        if cfg.needs_teacher and teacher is None:
            raise InputError(f"the configured loss terms {sorted(cfg.weights)} need a teacher; give one")
        if cfg.lambda_ms > 0 and sorted(map(int, student.aux)) != student_aux_layers(student.num_layers, cfg.blocks):
            raise InputError(f"lambda_ms > 0 needs student heads on layers {student_aux_layers(student.num_layers, cfg.blocks)}, "
                             f"the student has {sorted(map(int, student.aux))}")
        self.pairs = block_pairs(teacher.num_layers, student.num_layers, cfg.blocks) if teacher else []
        if teacher is not None:
            if teacher.hidden_size != student.hidden_size:
                raise InputError(f"teacher hidden size {teacher.hidden_size} != student hidden size "
                                 f"{student.hidden_size}: feature losses need the same base family")
            if not torch.equal(teacher.item_emb, student.item_emb):
                raise InputError("teacher and student must score against the same item embeddings")
            if cfg.mode == "offline":
                teacher.requires_grad_(False)
        self.student, self.teacher, self.cfg = student, teacher, cfg

    def train(self, mode: bool = True) -> "Distiller":
        """An offline teacher stays in eval mode (no LoRA dropout) while the student trains."""
        super().train(mode)
        if self.teacher is not None and self.cfg.mode == "offline":
            self.teacher.eval()
        return self

    def losses(self, histories: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.student.hidden_states(histories)
        out = {"ce": self.student.item_loss(s[-1], targets)}
        if self.cfg.lambda_ms > 0:
            out["ms"] = torch.stack([self.student.item_loss(s[int(k)], targets, head)
                                     for k, head in self.student.aux.items()]).mean()
        if self.cfg.needs_teacher:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.mode == "online"):
                t = self.teacher.hidden_states(histories)
            if self.cfg.mode == "online":
                out["teacher_ce"] = self.teacher.item_loss(t[-1], targets)
            hs = torch.stack([s[j][:, -1] for _, j in self.pairs])            # [blocks, B, H]
            ht = torch.stack([t[i][:, -1] for i, _ in self.pairs]).detach()  # the teacher is the target
            if self.cfg.lambda_cos > 0:
                out["cos"] = (1 - F.cosine_similarity(hs, ht, dim=-1)).mean()
            if self.cfg.lambda_norm > 0:
                out["norm"] = (hs - ht).norm(dim=-1).mean()
        return out

    def forward(self, histories: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = self.losses(histories, targets)
        weights = self.cfg.weights
        if set(terms) != set(weights):  # never train with a configured term silently missing
            raise RuntimeError(f"distillation computed terms {sorted(terms)} but {sorted(weights)} are configured")
        loss = sum(w * terms[k] for k, w in weights.items())
        return {"loss": loss, **{f"loss_{k}": v.detach() for k, v in terms.items()}}
