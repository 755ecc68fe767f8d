"""SLIM student: label masking, LoRA fine-tuning and generation (in-process and served) with a tiny LLaMA."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from eval.errors import InputError
from eval.stage import run_stage
from slim.client import ClientConfig
from slim.finetune import HELDOUT, IGNORE, SlimStudentConfig, SlimStudentStage, split_users, tokenize_example
from slim.prompts import STUDENT
from slim.rationales import TeacherRationalesStage
from slim.records import RecordLog, read_records
from slim.student import StudentRationalesConfig, StudentRationalesStage
from tests.slim_fake_openai import make_dataset, run_with_data

ADAPTER = SlimStudentStage.name              # RUN/slim-student
RECORDS = StudentRationalesStage.name        # RUN/slim-student-rationales
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer LLaMA (hidden 32) with the local SmolLM2 tokenizer and chat template, and a run
    (`root`) with RUN/data and the teacher's records in RUN/slim-teacher-rationales."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from eval.assets import smollm2_path

    root = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = make_dataset(root) / "data"  # the run is root itself
    records = root / TeacherRationalesStage.name / "records.jsonl"
    with RecordLog(records) as log:
        for u in range(12):
            steps = {"step1": f"User {u} likes drama.", "step2": "Drama.", "step3": "Movie 1; Movie 2."}
            text = "\n".join(f"Step {i}: {t}" for i, t in enumerate(steps.values(), 1))
            log.append({"user": u, "prompt_version": "slim_teacher_v1", "model": "t", "error": None, **steps,
                        "text": text})
        log.append({"user": 12, "prompt_version": "slim_teacher_v1", "model": "t", "error": "missing step2",
                    "step1": "x", "step2": "", "step3": "", "text": "x"})
    return {"model": root / "model", "tok": tok, "data": data, "records": records, "root": root}


def test_prompt_tokens_are_masked_in_labels(tiny):
    from transformers import DataCollatorForSeq2Seq

    tok = tiny["tok"]
    ex = tokenize_example(tok, "User history: Fargo", "Step 1: likes crime.", max_length=512)
    n_prompt = len(tok.apply_chat_template([{"role": "user", "content": "User history: Fargo"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert tok.decode(ex["input_ids"][n_prompt:]) == "Step 1: likes crime." + tok.eos_token
    short = tokenize_example(tok, "p", "a", max_length=512)
    batch = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE, padding=True)([ex, short])
    assert (batch["labels"][1, len(short["labels"]):] == IGNORE).all()  # padding never counts
    assert len(tokenize_example(tok, "p " * 600, "a", max_length=64)["input_ids"]) == 64


def test_answer_collator_scores_answers_only_with_the_same_loss(tiny):
    """The LM head runs on the answer window only; the loss equals the full-sequence loss."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from slim.finetune import AnswerCollator
    from slim.lora import load_causal_lm

    tok = tiny["tok"]
    rows = [tokenize_example(tok, "User history: " + "Fargo; " * n, "Step 1: likes crime." * (3 - n), 512)
            for n in (1, 2)]
    full = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE, padding=True)(rows)
    cut = AnswerCollator(tok)(rows)
    n_prompt = min(r["labels"].index(next(x for x in r["labels"] if x != IGNORE)) for r in rows)
    assert cut["logits_to_keep"] == full["input_ids"].shape[1] - n_prompt + 1 < full["input_ids"].shape[1]
    assert (cut["labels"] != IGNORE).sum() == (full["labels"] != IGNORE).sum()
    model = load_causal_lm(tiny["model"]).eval()
    with torch.no_grad():
        out = model(**cut)
        assert out.logits.shape[1] == cut["logits_to_keep"]
        assert torch.allclose(out.loss, model(**full).loss, atol=1e-6)


def test_heldout_split_is_seeded_and_checked():
    users = list(range(100, 140))
    held, val, train = split_users(users, 5, 0.1, seed=3)
    assert (held, val, train) == split_users(users, 5, 0.1, seed=3) and held != split_users(users, 5, 0.1, 4)[0]
    assert len(held) == 5 and len(val) == 4 and len(train) == 31 and sorted(held + val + train) == users
    assert split_users(users, 0, 0.0, seed=3)[:2] == ([], [])
    for bad in (-1, 40):
        with pytest.raises(InputError, match=f"heldout = {bad}"):
            split_users(users, bad, 0.1, seed=3)
    with pytest.raises(InputError, match="unknown generation engine 'tgi'"):
        StudentRationalesConfig(engine="tgi")


def test_finetune_then_generate_locally(tiny, tmp_path):
    root = tiny["root"]
    adapter = root / ADAPTER
    cfg = SlimStudentConfig(base_model=str(tiny["model"]), epochs=1, batch_size=4, val_fraction=0.25, heldout=4)
    result = run_stage(SlimStudentStage(root, cfg))
    counts = result.counts
    assert result.status == "ran" and SlimStudentStage(root, cfg).out == adapter
    # 12 well-formed records (the errored one is skipped): 4 held out, then 2 of 8 for validation
    assert counts["heldout_users"] == 4 and counts["train_examples"] == 6 and counts["val_examples"] == 2
    held = json.loads((adapter / HELDOUT).read_text())
    assert len(held) == 4 and all(isinstance(u, int) and 0 <= u < 12 for u in held) and held == sorted(held)
    assert counts["examples_per_s"] > 0 and isinstance(counts["bf16"], bool)
    assert counts["val_loss"] is not None and counts["answer_tokens"] > 0
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny["model"])
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "manifest.json").exists()
    again = run_stage(SlimStudentStage(root, cfg))
    assert again.status == "up to date" and again.counts == counts  # up to date: skipped

    run = run_with_data(root, tmp_path / "run", ADAPTER)  # a run of its own: data and the trained adapter
    gen = StudentRationalesConfig(backend="local", batch_size=3, template=STUDENT, users=5, engine="transformers",
                                  client=ClientConfig(base_url="", max_tokens=6, temperature=0))
    summary = run_stage(StudentRationalesStage(run, gen)).counts
    assert summary["engine"] == "transformers"
    recs = read_records(run / RECORDS / "records.jsonl")
    assert summary["complete"] == 5 and len(recs) == 5
    r = next(iter(recs.values()))
    assert r["prompt_version"] == STUDENT and r["model"].startswith(f"student:{ADAPTER}:")
    assert {"step1", "step2", "step3", "text", "error", "completion_tokens"} <= set(r)


def test_served_student_through_the_batching_server(tiny, tmp_path):
    """The endpoint path for real: the transformers batching server on base + adapter (merged in memory),
    the shared client; its greedy answers are the in-process path's."""
    root = tiny["root"]
    if not (root / ADAPTER).exists():
        run_stage(SlimStudentStage(root, SlimStudentConfig(base_model=str(tiny["model"]), epochs=1, batch_size=4)))
    run = run_with_data(root, tmp_path / "run", ADAPTER)
    gen = StudentRationalesConfig(backend="endpoint", template=STUDENT, users=2,  # base_url "": serve the adapter
                                  engine="transformers",
                                  client=ClientConfig(base_url="", max_tokens=4, temperature=0, concurrency=2))
    summary = run_stage(StudentRationalesStage(run, gen)).counts
    assert summary["complete"] == 2 and summary["completion_tokens"] > 0 and summary["engine"] == "transformers"
    served = read_records(run / RECORDS / "records.jsonl")
    local = run_with_data(root, tmp_path / "local", ADAPTER)
    run_stage(StudentRationalesStage(local, replace(gen, backend="local")))
    assert {u: r["text"] for u, r in read_records(local / RECORDS / "records.jsonl").items()} == \
        {u: r["text"] for u, r in served.items()} and len(served) == 2


SLIM_PRESET = """
[slim-student]
base_model = "{model}"
epochs = 2.0
batch_size = 2
grad_accum = {accum}
heldout = 2
val_fraction = 0.2      # 10 records after the held-out 2: 2 validate, 8 train (2 global batches of 4)
lora_dropout = 0.0      # dropout draws differ between 1 and 2 processes (a stream per process)
bf16 = false
"""


@pytest.mark.slow  # ~30 s: one launch of 2 processes (each imports torch, transformers and peft)
def test_finetuning_on_two_processes_matches_one_process(tiny, tmp_path):
    """`fusion stage slim-student` under torchrun with 2 processes (gloo): the Trainer steps
    ceil(8 / (2 x 2 x 1)) = 2 times an epoch, evaluates every epoch, rank 1 writes nothing, and the
    losses and adapter equal those of one process taking the same global batch by accumulation."""
    from safetensors.torch import load_file

    from tests.test_distributed import AUDIT

    audited = tmp_path / "audited"  # rank 1's writes here are logged: the 2-process run and its temporary files
    runs = {n: run_with_data(tiny["root"], path, TeacherRationalesStage.name)
            for n, path in ((1, tmp_path / "run1"), (2, audited / "run2"))}
    presets = {n: tmp_path / f"p{n}.toml" for n in (1, 2)}
    for n, accum in ((1, 2), (2, 1)):
        presets[n].write_text(SLIM_PRESET.format(model=tiny["model"], accum=accum))
    hook, audit, tmp = tmp_path / "audit", tmp_path / "rank1_writes.log", audited / "tmp"
    hook.mkdir()
    tmp.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AUDIT_ROOT": str(audited), "AUDIT_LOG": str(audit), "TMPDIR": str(tmp),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), str(ROOT), os.environ.get("PYTHONPATH")]))}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "--module",
               "--", "fusion.cli", "stage", ADAPTER, "--run", str(runs[n]), "--preset", str(presets[n])]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # rank 1 built its copy of the stage in a temporary folder (which shows the audit was on), nothing in the run
    writes = audit.read_text().splitlines() if audit.exists() else []
    assert writes and all(w.split(" ", 1)[1].startswith(str(tmp)) for w in writes), writes
    assert [sorted(str(p.relative_to(r)) for p in r.rglob("*")) for r in runs.values()] == [
        sorted(str(p.relative_to(runs[1])) for p in runs[1].rglob("*"))] * 2  # the same files, no leftovers
    one, two = (json.loads((runs[n] / ADAPTER / "manifest.json").read_text())["counts"] for n in (1, 2))
    assert one["train_examples"] == two["train_examples"] == 8 and one["val_examples"] == two["val_examples"] == 2
    steps = [[(h["step"], h["epoch"]) for h in c["history"] if "eval_loss" in h] for c in (one, two)]
    assert steps[0] == steps[1] == [(2, 1.0), (4, 2.0)]  # ceil(8 / (2 x 2 x 1)) steps an epoch, evaluated each
    # rounded to 4 decimals in the counts: equal, or 1e-4 apart at a rounding boundary
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=2e-4)  # the mean over processes
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=2e-4)
    a, b = (load_file(runs[n] / ADAPTER / "adapter_model.safetensors") for n in (1, 2))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
