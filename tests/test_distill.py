"""Layer-wise distillation: block pairing, each loss term's effect, guards, and the stages end to end."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from eval.dataset import prepare_dataset
from eval.errors import InputError
from eval.io import read_json
from eval.preprocess import PrepareConfig
from eval.stage import run_stage
from slmrec.distill import DistillConfig, Distiller, block_pairs
from slmrec.llm import LLMRec, LLMRecConfig
from slmrec.llm_train import (LLMTrainConfig, SLMRecStudentConfig, SLMRecTeacherConfig, StudentStage, TeacherStage,
                              build_student)

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
ITEMS = torch.randn(31, 8, generator=torch.Generator().manual_seed(1))
H = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5], [0, 7, 8, 9, 10]])
T = torch.tensor([[0, 0, 4, 5, 6], [2, 3, 4, 5, 6], [0, 8, 9, 10, 11]])
TERMS = {"cos": "lambda_cos", "norm": "lambda_norm", "ms": "lambda_ms"}


def model(layers, seed=0, **kw):
    return LLMRec(LLMRecConfig(llama=TINY, layers=layers, lora_r=4, lora_dropout=0.0, seed=seed, **kw), ITEMS)


def teacher8():
    t = model(8, seed=5)
    with torch.no_grad():  # a "trained" teacher: non-zero adapters
        for p in t.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return t


def student_grads(**lambdas):
    cfg = DistillConfig(**{"lambda_cos": 0.0, "lambda_norm": 0.0, "lambda_ms": 0.0, **lambdas})
    torch.manual_seed(0)  # the same initial student every time (its seed is drawn from torch's generator)
    student = build_student(SLMRecStudentConfig(student=LLMRecConfig(llama=TINY, layers=4, lora_r=4, lora_dropout=0.0),
                                                distill=cfg), None, ITEMS)
    d = Distiller(student, teacher8(), cfg).train()
    out = d(H, T)
    out["loss"].backward()
    assert all(p.grad is None for p in d.teacher.parameters())  # offline: the teacher is frozen
    return out, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None and "aux" not in n}


def test_block_pairing():
    assert block_pairs(8, 4, 4) == [(2, 1), (4, 2), (6, 3), (8, 4)]
    assert block_pairs(32, 8, 4) == [(8, 2), (16, 4), (24, 6), (32, 8)]
    with pytest.raises(InputError, match="not divisible into 4 blocks"):
        block_pairs(8, 6, 4)


@pytest.mark.parametrize("term", TERMS)
def test_each_loss_term_changes_student_gradients_only_when_on(term):
    _, base = student_grads()
    out_off, off = student_grads(**{TERMS[term]: 0.0})
    out_on, on = student_grads(**{TERMS[term]: 1.0})
    assert f"loss_{term}" in out_on and f"loss_{term}" not in out_off
    assert all(torch.equal(off[n], base[n]) for n in base)
    assert any(not torch.allclose(on[n], base[n]) for n in base)


def test_configured_distillation_loss_is_really_on():
    cfg = DistillConfig()  # the defaults: cos 1, norm 0.1, ms 1
    student = build_student(SLMRecStudentConfig(student=LLMRecConfig(llama=TINY, layers=4, lora_r=4)), None, ITEMS)
    assert sorted(map(int, student.aux)) == [1, 2, 3]
    d = Distiller(student, teacher8(), cfg)
    out = d(H, T)
    assert out["loss_cos"] > 0 and out["loss_norm"] > 0 and out["loss_ms"] > 0
    total = out["loss_ce"] + out["loss_cos"] + 0.1 * out["loss_norm"] + out["loss_ms"]
    assert torch.allclose(out["loss"].detach(), total)
    with pytest.raises(InputError, match="need a teacher"):
        Distiller(student, None, cfg)
    d.losses = lambda h, t: {"ce": torch.tensor(1.0)}  # a term silently going missing is an error
    with pytest.raises(RuntimeError, match="configured"):
        d(H, T)
    with pytest.raises(InputError, match="not one of"):
        DistillConfig(mode="semi")
    with pytest.raises(InputError, match="needs student heads"):
        Distiller(model(4), teacher8(), cfg)


def test_online_kd_trains_the_teacher_too():
    cfg = DistillConfig(mode="online")
    student = build_student(SLMRecStudentConfig(student=LLMRecConfig(llama=TINY, layers=4, lora_r=4), distill=cfg),
                            None, ITEMS)
    d = Distiller(student, model(8, seed=3), cfg).train()
    out = d(H, T)
    out["loss"].backward()
    assert "loss_teacher_ce" in out
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.teacher.parameters())


def test_teacher_of_the_wrong_shape_is_a_clear_error():
    wide = LLMRec(LLMRecConfig(llama={**TINY, "hidden_size": 48}, layers=8, lora_r=4), ITEMS)
    with pytest.raises(InputError, match="hidden size 48 != student hidden size 32"):
        Distiller(model(4, aux_heads=[1, 2, 3]), wide, DistillConfig())
    with pytest.raises(InputError, match="teacher has 6 layers"):
        Distiller(model(4, aux_heads=[1, 2, 3]), model(6), DistillConfig())


@pytest.fixture
def run(synthetic, tmp_path):
    """A run with RUN/data prepared and a hand-made RUN/sasrec holding only the item embeddings."""
    run = tmp_path / "run"
    prepare_dataset(PrepareConfig(source=str(synthetic), rating_gt=None, user_core=1, item_core=1, negatives=[10]),
                    run)
    (run / "sasrec").mkdir()
    save_file({"item_embeddings": ITEMS}, run / "sasrec" / "item_embeddings.safetensors")
    return run


def test_teacher_then_student_end_to_end(run, tmp_path):
    train = LLMTrainConfig(epochs=1, batch_size=8, lr=5e-3, max_len=8, evals_per_epoch=1)
    tcfg = SLMRecTeacherConfig(model=LLMRecConfig(llama=TINY, layers=4, lora_r=4), train=train)
    assert run_stage(TeacherStage(run, tcfg)).status == "ran"
    teacher = run / "slmrec-teacher"
    metrics = read_json(teacher / "metrics.json")
    assert metrics["full ranking"]["users"] == 40
    assert (teacher / "model.safetensors").exists() and not (run / ".slmrec-teacher.work").exists()
    stamp = (teacher / "model.safetensors").stat().st_mtime_ns
    assert run_stage(TeacherStage(run, tcfg)).status == "up to date"  # skipped
    assert read_json(teacher / "metrics.json") == metrics
    assert (teacher / "model.safetensors").stat().st_mtime_ns == stamp

    dcfg = SLMRecStudentConfig(student=LLMRecConfig(layers=2, lora_r=4), distill=DistillConfig(blocks=2), train=train)
    assert run_stage(StudentStage(run, dcfg)).status == "ran"
    student = run / "slmrec-student"
    out = read_json(student / "metrics.json")
    log = json.loads((student / "train_log.json").read_text())
    assert set(log["loss_terms"]) == {"ce", "cos", "norm", "ms"} and log["block_pairs"] == [[2, 1], [4, 2]]
    assert any("loss_cos" in row for row in log["history"])
    assert out["full ranking"]["users"] == 40 and LLMRec.from_pretrained(student).num_layers == 2

    other = tmp_path / "other"  # a run whose teacher was trained on another catalog
    shutil.copytree(run / "data", other / "data")
    bad = LLMRec(LLMRecConfig(llama=TINY, layers=4, lora_r=4), torch.randn(21, 8))
    bad.save_pretrained(other / "slmrec-teacher")
    with pytest.raises(InputError, match="teacher scores 20 items, the data set has 30"):
        run_stage(StudentStage(other, dcfg))
    assert not (other / "slmrec-student").exists()


def test_interrupted_training_resumes_from_its_checkpoint(run, monkeypatch):
    from eval.dataset import load_dataset
    from slmrec import llm_train

    ds = load_dataset(run / "data")
    cfg = LLMTrainConfig(epochs=1, batch_size=8, max_len=8, evals_per_epoch=2)  # 5 steps, checkpoint at 2 and 4
    fingerprint = {"test": 1}
    original, calls = llm_train.RecTrainer.training_step, []

    def crash_at_step_4(self, *a, **kw):
        calls.append(1)
        if len(calls) == 4 and crash:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    crash = True

    monkeypatch.setattr(llm_train.RecTrainer, "training_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        llm_train.train_llm(model(2), model(2), ds, cfg, run / "work", fingerprint)
    assert (run / "work" / "checkpoint-2").exists()
    crash = False
    calls.clear()
    m = model(2)
    log = llm_train.train_llm(m, m, ds, cfg, run / "work", fingerprint)
    assert len(calls) == 3 and log["steps"] == 5  # steps 3..5 only: resumed from checkpoint-2
