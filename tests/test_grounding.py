"""Grounding of rationale steps in the catalogue, and the domain that names the items in the prompts."""
from dataclasses import replace

import pandas as pd
import pytest

from eval.dataset import ITEMS, MOVIES, DataStage, infer_domain, prepare_dataset
from eval.preprocess import PrepareConfig
from eval.stage import run_stage
from slim.client import Completion
from slim.grounding import Catalogue
from slim.prompts import STUDENT, TEACHER, load_template
from slim.rationales import GenerationConfig, make_record, user_prompts

ROWS = [  # item, title, year, categories
    (1, "Matrix, The", "1999", "Action, Sci-Fi"),
    (2, "Scream", "1996", "Horror, Thriller"),
    (3, "Scream 2", "1997", "Horror, Thriller"),
    (4, "Sabrina", "1954", "Comedy, Romance"),
    (5, "Sabrina", "1995", "Comedy, Romance"),
    (6, "Blues Brothers, The", "1980", "Comedy, Musical"),
    (7, "Blues Brothers 2000", "1998", "Comedy, Musical"),
    (8, "Schindler's List", "1993", "Drama, War"),
    (9, "Amélie", "2001", "Comedy, Romance"),
    (10, "1941", "1979", "Comedy, War"),
]


@pytest.fixture(scope="module")
def catalogue():
    items = pd.DataFrame(ROWS, columns=["item", "title", "year", "categories"]).assign(
        raw_id=lambda d: d["item"].astype(str), brand="")
    return Catalogue(items)


@pytest.mark.parametrize("text, items", [
    ("the matrix", [1]),                                  # case, the article moved back to the front
    ("MATRIX, THE (1999)!", [1]),                         # punctuation, "Title, The", the year present
    ("Matrix", [1]),                                      # the year and article absent
    ("Scream 2", [3]),                                    # "Scream" lies inside "Scream 2": only the longer
    ("Scream; then Scream 2 (1997)", [2, 3]),
    ("Screamers", []),                                    # whole words only
    ("Sabrina (1995)", [5]),                              # the year picks among items of one title
    ("Sabrina", [4, 5]),                                  # no year, no history: either
    ("The Blues Brothers (1980)", [6]),                   # a year after a title is not a title's own number
    ("Blues Brothers 2000", [7]),
    ("schindlers list and AMELIE", [8, 9]),               # apostrophes and accents
    ("1941 (1979)", [10]),                                # a title that is only a year
])
def test_step3_names_catalogue_items_whatever_their_case_punctuation_article_and_year(catalogue, text, items):
    assert catalogue.step3(text).named == items


def test_the_users_own_item_decides_between_items_of_one_title(catalogue):
    assert catalogue.ground({"step3": "Sabrina"}, [4, 8])["step3_items"] == [4]
    assert catalogue.ground({"step3": "Sabrina (1995)"}, [4])["step3_items"] == [5]  # a written year wins


def test_entries_and_how_many_name_something(catalogue):
    g = catalogue.step3("Based on steps 1 and 2:\n1. The Matrix\n2. An Unknown Film (2003)\n3. Scream 2")
    assert (g.named, g.entries, g.grounded) == ([1, 3], 3, 2)  # the lead-in line is no entry
    g = catalogue.step3("Matrix, The, Unknown Film, Scream")   # a one-line list, a moved article kept whole
    assert (g.named, g.entries, g.grounded) == ([1, 2], 3, 2)
    g = catalogue.step2("Thrillers, comedies, Westerns")  # plurals; Western is no category here
    assert (g.named, g.entries, g.grounded) == (["Thriller", "Comedy"], 3, 2)


def test_a_record_whose_step_3_names_no_catalogue_item(catalogue):
    fields = catalogue.ground({"step2": "Anything good.", "step3": "Something great to watch tonight."}, [1, 2])
    assert fields == {"step2_categories": [], "step2_entries": 1, "step2_grounded": 0, "step3_items": [],
                      "step3_entries": 1, "step3_grounded": 0, "step3_in_history": []}


def test_generated_records_carry_grounding_against_the_history_the_prompt_showed(synthetic, tmp_path):
    ds = prepare_dataset(PrepareConfig(source=str(synthetic), rating_gt=None, user_core=1, item_core=1,
                                       negatives=[5]), tmp_path)
    titles = ds.items.set_index("item")["title"]
    seen, nxt = int(ds.rationale_history(0)[-1]), int(ds.sequences[0][-3])
    text = f"Step 1: likes drama.\nStep 2: Drama, Westerns.\nStep 3: {titles[seen]}; {titles[nxt]}; Nothing Known"
    rec = make_record(ds, 0, TEACHER, "m", "prompt", Completion(text, 10, 20, 0.5, "stop"))
    assert rec["error"] is None and rec["step2_categories"] == ["Drama"] and rec["step2_grounded"] == 1
    assert rec["step3_items"] == [seen, nxt] and rec["step3_in_history"] == [seen]
    assert (rec["step3_entries"], rec["step3_grounded"]) == (3, 2)


def test_the_domain_comes_from_the_data_and_reaches_the_prompts(synthetic, tmp_path):
    no_items = pd.DataFrame({"categories": []})
    assert infer_domain("ml-100k", "auto", None, no_items) == MOVIES
    assert infer_domain("/d/reviews_Beauty_5.json.gz", "auto", None, no_items) == "beauty products"
    assert infer_domain("/d/All_Beauty.jsonl.gz", "amazon", "/d/meta_Video_Games.jsonl.gz", no_items) == "video games"
    books = pd.DataFrame({"categories": ["Books, Fiction", "Books", "Kindle Store"]})
    assert infer_domain("/d/reviews.json.gz", "amazon", None, books) == "books"  # most items' top category
    assert infer_domain(str(synthetic), "auto", None, no_items) == ITEMS

    cfg = PrepareConfig(source=str(synthetic), rating_gt=None, user_core=1, item_core=1, negatives=[5])
    ds = prepare_dataset(cfg, tmp_path / "inferred")
    assert ds.domain == ITEMS
    games = prepare_dataset(replace(cfg, domain="board games"), tmp_path / "games")
    assert games.domain == "board games"
    assert games.fingerprint != ds.fingerprint  # same files, but the prompts of later stages change
    assert run_stage(DataStage(tmp_path / "games", replace(cfg, domain="board games"))).status == "up to date"
    teacher = user_prompts(games, [0], GenerationConfig(template=TEACHER))[0]
    assert "a user's board games history" in teacher and "movie" not in teacher
    assert not any("movie" in load_template(t).text.lower() for t in (TEACHER, STUDENT))
    student = user_prompts(games, [0], GenerationConfig(template=STUDENT))[0]
    assert "history of board games" in student and "Step 3: board games to recommend" in student
