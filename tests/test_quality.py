"""Rationale quality: hand-computed metrics, and the stage over teacher, student and no-LLM control records."""
import json

import pytest

from eval.dataset import prepare_dataset
from eval.errors import InputError
from eval.preprocess import PrepareConfig
from eval.stage import run_stage
from slim.profile import ProfileConfig, ProfileRationalesStage
from slim.quality import QualityStage, quality_section, rouge_l_f1, source_metrics
from slim.records import RECORDS, RecordLog


def test_rouge_l_f1_by_hand():
    # LCS of "the cat sat on the mat" / "the cat lay on a mat" is "the cat on mat": 4 of 6 and 6 tokens
    assert rouge_l_f1("The cat sat on the mat.", "the cat lay on a mat") == pytest.approx(2 * 4 / 12)
    assert rouge_l_f1("Fargo", "fargo!") == 1.0
    assert rouge_l_f1("", "fargo") == 0.0 and rouge_l_f1("heat", "fargo") == 0.0


def graded(text, error, s2, s3, items, seen, nxt):
    """A graded record: (grounded, entries) of steps 2 and 3, the step-3 items, those seen, the next item."""
    steps = dict(zip(("step1", "step2", "step3"), text.split("|"))) if error is None else {}
    return {**steps, "text": text, "error": error, "step2_grounded": s2[0], "step2_entries": s2[1],
            "step3_grounded": s3[0], "step3_entries": s3[1], "step3_items": items, "step3_in_history": seen,
            "next_item": nxt}


def test_source_metrics_by_hand():
    recs = [graded("a|b|c", None, (1, 2), (2, 3), [5, 7], [5], 7),
            graded("a|b|c", None, (0, 1), (1, 1), [9], [], 3),          # the same text as the first
            graded("off format", "missing step2, step3", (0, 0), (0, 0), [], [], 4),
            graded("d|e|f", None, (1, 1), (0, 4), [], [], 8)]
    assert source_metrics(recs) == {
        "records": 4, "well_formed": 0.75, "distinct": 0.75,
        "step3_grounded": round(3 / 8, 4), "step2_grounded": 0.5, "step3_items": 0.75,
        "step3_from_history": round(1 / 3, 4), "next_item_hit": 0.25}


def write_records(path, rows, model):
    with RecordLog(path) as log:
        for user, text in rows.items():
            steps = dict(zip(("step1", "step2", "step3"), (s.split(": ", 1)[1] for s in text.split("\n"))))
            log.append({"user": user, "prompt_version": "v", "model": model, **steps, "text": text, "error": None})


def test_stage_measures_teacher_student_and_the_control_on_held_out_users(synthetic, tmp_path):
    ds = prepare_dataset(PrepareConfig(source=str(synthetic), rating_gt=None, user_core=1, item_core=1,
                                       negatives=[5]), tmp_path)
    title = ds.items.set_index("item")["title"].to_dict()
    seen = {u: title[int(ds.rationale_history(u)[-1])] for u in range(3)}
    nxt = {u: title[int(ds.sequences[u][-3])] for u in range(3)}
    teacher = {u: f"Step 1: likes drama.\nStep 2: Drama.\nStep 3: {nxt[u]}; {seen[u]}" for u in range(3)}
    write_records(tmp_path / "slim-teacher-rationales" / RECORDS, teacher, "t")
    student = {0: teacher[0], 1: f"Step 1: likes comedy.\nStep 2: Comedy.\nStep 3: {seen[1]}; Unknown Film"}
    write_records(tmp_path / "slim-student-rationales" / RECORDS, student, "s")
    with RecordLog(tmp_path / "slim-student-rationales" / RECORDS) as log:   # an earlier cut's: quality ignores it
        log.append({"user": 1, "prompt_version": "v", "model": "s", "prefix": 3, "text": "Step 1: x", "error": "y"})
    (tmp_path / "slim-student").mkdir()
    (tmp_path / "slim-student" / "heldout_users.json").write_text("[0, 1]")
    run_stage(ProfileRationalesStage(tmp_path, ProfileConfig(cuts=3)))   # end rationales graded, not the cuts

    result = run_stage(QualityStage(tmp_path))
    assert result.counts == {"teacher": 3, "student": 2, "profile": ds.num_users, "heldout_users": 2}
    q = json.loads((tmp_path / "quality" / "quality.json").read_text())
    t, s, p = (q["sources"][k] for k in ("teacher", "student", "profile"))
    assert t == {"records": 3, "well_formed": 1.0, "distinct": 1.0, "step3_grounded": 1.0, "step2_grounded": 1.0,
                 "step3_items": 2.0, "step3_from_history": 0.5, "next_item_hit": 1.0}
    assert (s["step3_grounded"], s["step2_grounded"], s["next_item_hit"]) == (0.75, 0.5, 0.5)
    assert s["step3_from_history"] == round(2 / 3, 4)  # "Unknown Film" names nothing; Comedy is no category here
    # the control names the recent history only: every title is in the catalogue and none is the next item
    assert (p["well_formed"], p["step3_grounded"], p["step3_from_history"], p["next_item_hit"]) == (1.0, 1.0, 1.0, 0.0)
    held = q["heldout"]["sources"]
    assert held["teacher"] == {"users": 2, "next_item_hit": 1.0}
    hand = rouge_l_f1(student[1].replace("\n", " "), teacher[1].replace("\n", " "))
    assert held["student"]["users"] == 2 and held["student"]["next_item_hit"] == 0.5
    assert held["student"]["rouge_l_f1"] == round((1.0 + hand) / 2, 4)
    assert 0.5 < held["student"]["cosine"] < 1.0  # one identical pair (cosine 1), one that differs
    assert held["profile"]["users"] == 2 and held["profile"]["next_item_hit"] == 0.0
    assert [e["user"] for e in q["examples"]] == [0, 1]
    section = quality_section(tmp_path)
    assert section.startswith("\n## Rationale quality") and "| profile | " in section and teacher[1] in section
    assert run_stage(QualityStage(tmp_path)).status == "up to date"

    write_records(tmp_path / "slim-teacher-rationales" / RECORDS, {999: teacher[0]}, "t")  # not a user of the data
    with pytest.raises(InputError, match="records.jsonl: a record of user 999, who is not in"):
        run_stage(QualityStage(tmp_path))
