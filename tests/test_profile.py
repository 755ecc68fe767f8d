"""The no-LLM control source: template rationales from exactly what an LLM rationale may see."""
import json

import pandas as pd
import pytest

from eval.assets import smollm2_path
from eval.dataset import load_dataset, prepare_dataset
from eval.errors import InputError
from eval.preprocess import PrepareConfig
from eval.stage import run_stage
from slim.profile import ProfileConfig, ProfileRationalesStage, profile_steps
from slim.prompts import STUDENT, PromptBuilder
from slim.records import parse_steps, read_records


def test_steps_from_hand_made_items():
    items = pd.DataFrame({"item": [1, 2, 3], "raw_id": ["a", "b", "c"], "title": ["Alien", "Heat", ""],
                          "categories": ["Horror, Sci-Fi", "Crime, Drama", "Drama"],
                          "year": ["1979", "1995", ""]}).set_index("item")
    steps = profile_steps(items, [1, 2, 3, 2], ProfileConfig(categories=2, recent=3))
    assert steps == {"step1": "Interacted with Drama (43%), Crime (29%); mostly from the 1990s (67%), 1970s (33%).",
                     "step2": "Drama, Crime.",
                     "step3": "Heat (1995); item c; Alien (1979)."}  # most recent first, once; no title: the id


def test_stage_writes_parseable_records_that_never_name_a_target(synthetic, tmp_path):
    ds = prepare_dataset(PrepareConfig(source=str(synthetic), rating_gt=None, user_core=1, item_core=1,
                                       negatives=[5]), tmp_path)
    assert run_stage(ProfileRationalesStage(tmp_path)).counts == {"users": ds.num_users, "complete": ds.num_users,
                                                                  "rationales": ds.num_users}
    recs = read_records(tmp_path / "profile-rationales" / "records.jsonl")
    assert sorted(recs) == list(range(ds.num_users))
    titles = ds.items.set_index("item")["title"]
    for u, rec in recs.items():
        assert parse_steps(rec["text"]) == ({s: rec[s] for s in ("step1", "step2", "step3")}, None)
        named = set(rec["step3"].rstrip(".").split("; "))
        targets = {f"{titles[i]} (" for i in ds.sequences[u][-3:]} - {f"{titles[i]} (" for i in ds.rationale_history(u)}
        assert not any(n.startswith(t) for n in named for t in targets), (u, rec["step3"])
    assert run_stage(ProfileRationalesStage(tmp_path)).status == "up to date"
    json.loads((tmp_path / "profile-rationales" / "manifest.json").read_text())


def test_cuts_write_a_record_per_prefix_and_the_users_table_keeps_one_per_user(synthetic, tmp_path):
    """cuts = 3: a record per prefix (3, 6 and the end's 9 of 12-item users), the end ones exactly what
    cuts = 1 writes; a rerun writes no duplicate; the vectors keep one row per user in the users table,
    the earlier cuts go to their own table (re-encoded by (user, prefix)), which goes with cuts back at 1."""
    import lancedb

    from fusion.vectors import load_vectors
    from slim.encode import CUTS_TABLE, ProfileEncodeConfig, ProfileVectorsStage, has_table, read_vectors
    from slim.records import read_cut_records

    ds = prepare_dataset(PrepareConfig(source=str(synthetic), rating_gt=None, user_core=1, item_core=1,
                                       negatives=[5]), tmp_path)
    path = tmp_path / "profile-rationales" / "records.jsonl"
    run_stage(ProfileRationalesStage(tmp_path))
    ends = path.read_bytes().splitlines()
    run_stage(ProfileVectorsStage(tmp_path, ProfileEncodeConfig()))

    def digest(folder):
        return json.loads((folder / "manifest.json").read_text())["outputs_sha256"]

    digest_one, profile_one = digest(tmp_path / "vectors-profile"), digest(tmp_path / "profile-rationales")
    cfg = ProfileConfig(cuts=3)
    assert run_stage(ProfileRationalesStage(tmp_path, cfg)).counts["rationales"] == 3 * ds.num_users
    lines = path.read_bytes().splitlines()
    keys = [(r["user"], r.get("prefix", 9)) for r in map(json.loads, lines)]   # the end record has no prefix
    assert sorted(keys) == [(u, p) for u in range(ds.num_users) for p in (3, 6, 9)]
    assert [ln for ln in lines if b'"prefix"' not in ln] == ends           # the end rationales as cuts = 1 wrote them
    items = ds.items.set_index("item")
    for (u, p), rec in read_cut_records(path).items():
        assert rec["step3"] == profile_steps(items, ds.sequences[u][:p].tolist(), cfg)["step3"]
    run_stage(ProfileRationalesStage(tmp_path, cfg), force=True)
    assert path.read_bytes().splitlines() == lines                          # rebuilt, never appended to

    counts = run_stage(ProfileVectorsStage(tmp_path, ProfileEncodeConfig())).counts
    db = tmp_path / "vectors-profile"
    assert read_vectors(db, "user_rationales")[0].tolist() == list(range(ds.num_users))   # one per user
    assert counts[CUTS_TABLE]["rows"] == 2 * ds.num_users
    v = load_vectors(db)
    assert sorted(zip(v.cut_ids.tolist(), v.cut_prefixes.tolist())) == sorted((u, p) for u, p in keys if p < 9)
    run_stage(ProfileRationalesStage(tmp_path, ProfileConfig(cuts=4)))     # prefixes 4, 6, 9: 6 is kept as it was
    four = run_stage(ProfileVectorsStage(tmp_path, ProfileEncodeConfig())).counts[CUTS_TABLE]
    assert four.items() >= {"rows": 2 * ds.num_users, "encoded": ds.num_users, "deleted": ds.num_users}.items()
    assert sorted(set(load_vectors(db).cut_prefixes.tolist())) == [4, 6]
    run_stage(ProfileRationalesStage(tmp_path))                             # back to one rationale per user
    again = run_stage(ProfileVectorsStage(tmp_path, ProfileEncodeConfig()))
    assert not has_table(lancedb.connect(str(db)), CUTS_TABLE) and len(load_vectors(db).cut_ids) == 0
    assert again.status == "ran" and CUTS_TABLE not in again.counts
    assert digest(db) == digest_one and digest(tmp_path / "profile-rationales") == profile_one   # as before cuts


def test_a_bad_cuts_setting_names_its_stage():
    from slim.student import StudentRationalesConfig

    with pytest.raises(InputError, match=r"^profile-rationales\.cuts must be at least 1, not 0$"):
        ProfileConfig(cuts=0)
    with pytest.raises(InputError, match=r"^slim-student-rationales\.cuts must be at least 1, not -1$"):
        StudentRationalesConfig(cuts=-1)


def test_the_control_reads_the_history_window_the_llm_prompt_shows(synthetic, tmp_path):
    """A budget of ~4 items: step 3 lists exactly the titles the student's prompt shows, no older one."""
    ds = prepare_dataset(PrepareConfig(source=str(synthetic), rating_gt=None, user_core=1, item_core=1,
                                       negatives=[5]), tmp_path)
    run_stage(ProfileRationalesStage(tmp_path, ProfileConfig(history_tokens=40, recent=50)))
    recs = read_records(tmp_path / "profile-rationales" / "records.jsonl")
    prompts = PromptBuilder(ds.items, STUDENT, 40, smollm2_path(), ds.domain)
    cut = 0
    for u, rec in recs.items():
        block = prompts(ds.rationale_history(u).tolist()).split("<history>\n")[1].split("\n</history>")[0]
        shown = {line[2:].split(";")[0] for line in block.splitlines()}  # "- Movie 3 (1993); Drama"
        assert set(rec["step3"].rstrip(".").split("; ")) == shown, u
        cut += len(shown) < len(set(ds.rationale_history(u)))
    assert cut == len(recs)  # every history here is longer than the window


def test_the_pipeline_refuses_a_control_that_reads_another_window(tmp_path):
    from fusion.pipeline import build_stages

    with pytest.raises(InputError, match="profile-rationales.history_tokens = 50 differs from "
                                         "slim-student-rationales.history_tokens = 96"):
        build_stages(tmp_path, "demo", ["profile-rationales.history_tokens=50"])
