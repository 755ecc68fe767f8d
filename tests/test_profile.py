"""The no-LLM control source: template rationales from exactly what an LLM rationale may see."""
import json

import pandas as pd

from eval.dataset import load_dataset, prepare_dataset
from eval.preprocess import PrepareConfig
from eval.stage import run_stage
from slim.profile import ProfileConfig, ProfileRationalesStage, profile_steps
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
