"""Scale benchmark: data preparation on synthetic Amazon-2023 dumps, today's loader next to the streaming one.

Generates seeded synthetic Amazon-2023 review and metadata dumps (gz, the 2023 field set and about its
line sizes) of 1M, 5M and 20M reviews, then runs the whole prepare path (`fusion prepare`: load, k-core,
split, ids, candidates, parquet) in a child process per loader and prints time and peak RSS side by side,
with the CPU's flags. The old loader is the code of OLD_REF (the commit before the streaming reader),
run from a copy of its `eval/` package; it runs only up to --old-max reviews.

With --stages, instead: the whole pipeline of a preset (`fusion run`, the demo by default) once on 1 and
once on N processes (training stages under torchrun via --nproc, rationale generation on N vLLM
data-parallel engines, encoding on N pool processes; the other stages run once either way), each stage's
seconds side by side, then a paired test (Holm-adjusted) of every model of the two reports, user by user.
Usage:
  python bench/bench_scale.py [--sizes 1M,5M,20M] [--old-max 5M] [--work /tmp/bench-scale] [--negatives 100,999]
  python bench/bench_scale.py --stages [--preset demo] [--nproc 2] [--keep-global-batch]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OLD_REF = "7528538"  # the commit before the streaming Amazon reader: today's loader and prepare

# Shape of the synthetic data: Amazon 2023 Books has 10.3M users and 4.4M items for 29.5M reviews (Hou et al.
# 2024, the data set's statistics table); users and items are drawn with heavy tails so that a 5-core keeps a
# minority of them, as on the real dumps.
USERS_PER_REVIEW, ITEMS_PER_REVIEW = 0.35, 0.15
USER_ZIPF, ITEM_ZIPF = 0.9, 0.9
RATINGS = (np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([0.10, 0.05, 0.08, 0.17, 0.60]))
T0, T1 = 946_684_800_000, 1_694_000_000_000  # 2000-01-01 .. 2023-09, in ms
ALPHABET = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", dtype=np.uint8)
ASIN_ALPHABET = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
WORDS = ("the a this book story read great good love loved characters plot author series really well written "
         "recommend enjoyed page pages end ending first time would more much one life could also very fun "
         "little easy interesting felt thought never writing style novel chapter kindle short long best "
         "favorite again family world history mystery romance fantasy quick boring slow wonderful beautiful "
         "caf\u00e9 na\u00efve fianc\u00e9e \u00fcber \u2014 \u201cquoted\u201d \u2764\ufe0f \U0001f600 \u4e66 \u0411\u0443\u043a").split()
CHUNK = 250_000  # reviews generated at a time


def _ids(rng: np.random.Generator, n: int, width: int, alphabet: np.ndarray, prefix: bytes) -> np.ndarray:
    """n random ids of `width` characters after `prefix`, as a bytes array (unique with high probability)."""
    body = alphabet[rng.integers(0, len(alphabet), size=(n, width))]
    raw = np.concatenate([np.broadcast_to(np.frombuffer(prefix, np.uint8), (n, len(prefix))), body], axis=1)
    return np.ascontiguousarray(raw).view(f"S{width + len(prefix)}").ravel()


def _zipf_cdf(n: int, a: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** a
    return np.cumsum(w / w.sum())


def _sentences(rng: np.random.Generator, count: int, mean_words: int) -> list[str]:
    words = np.array(WORDS, dtype=object)
    lengths = np.maximum(1, rng.lognormal(np.log(mean_words), 0.8, size=count).astype(int))
    out = []
    for k in lengths:
        text = " ".join(words[rng.integers(0, len(words), size=k)])
        out.append(text[:1].upper() + text[1:] + ".")
    return out


def generate(n: int, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """reviews_N.jsonl.gz and meta_N.jsonl.gz in `folder` (reused when there): Amazon 2023's field set."""
    folder.mkdir(parents=True, exist_ok=True)
    reviews, meta = folder / f"reviews_{n}.jsonl.gz", folder / f"meta_{n}.jsonl.gz"
    if reviews.exists() and meta.exists():
        return reviews, meta
    rng = np.random.default_rng(seed)
    users, items = max(1, int(n * USERS_PER_REVIEW)), max(1, int(n * ITEMS_PER_REVIEW))
    user_ids = _ids(rng, users, 27, ALPHABET, b"A")
    isbn = rng.random(items) < 0.3  # books: a 10-digit ISBN as the asin
    item_ids = np.where(isbn, _ids(rng, items, 10, ASIN_ALPHABET[:10], b""), _ids(rng, items, 8, ASIN_ALPHABET, b"B0"))
    user_cdf, item_cdf = _zipf_cdf(users, USER_ZIPF), _zipf_cdf(items, ITEM_ZIPF)
    user_perm, item_perm = rng.permutation(users), rng.permutation(items)  # popularity not in id order
    texts = [json.dumps(t, ensure_ascii=False) for t in _sentences(rng, 20_000, 70)]
    titles = [json.dumps(t, ensure_ascii=False) for t in _sentences(rng, 5_000, 5)]
    images = ('[]', '[{"small_image_url": "https://m.media-amazon.com/images/I/71x+eQ0cXwL._SL256_.jpg", '
                    '"medium_image_url": "https://m.media-amazon.com/images/I/71x+eQ0cXwL._SL800_.jpg", '
                    '"large_image_url": "https://m.media-amazon.com/images/I/71x+eQ0cXwL._SL1600_.jpg", '
                    '"attachment_type": "IMAGE"}]')
    tmp = reviews.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        for start in range(0, n, CHUNK):
            k = min(CHUNK, n - start)
            u = user_perm[np.searchsorted(user_cdf, rng.random(k))]
            i = item_perm[np.searchsorted(item_cdf, rng.random(k))]
            rating = rng.choice(RATINGS[0], size=k, p=RATINGS[1])
            stamp = (T0 + (T1 - T0) * rng.random(k) ** 0.5).astype(np.int64)
            text, title = rng.integers(0, len(texts), k), rng.integers(0, len(titles), k)
            votes, verified, img = rng.geometric(0.6, k) - 1, rng.random(k) < 0.9, rng.random(k) < 0.05
            u, i, rating, stamp, text, title, votes, verified, img = (
                x.tolist() for x in (u, i, rating, stamp, text, title, votes, verified, img))
            f.write("".join(
                f'{{"rating": {rating[j]}, "title": {titles[title[j]]}, "text": {texts[text[j]]}, '
                f'"images": {images[img[j]]}, "asin": "{item_ids[i[j]].decode()}", '
                f'"parent_asin": "{item_ids[i[j]].decode()}", "user_id": "{user_ids[u[j]].decode()}", '
                f'"timestamp": {stamp[j]}, "helpful_vote": {votes[j]}, '
                f'"verified_purchase": {"true" if verified[j] else "false"}}}\n' for j in range(k)))
    tmp.rename(reviews)
    _generate_meta(rng, item_ids, meta)
    return reviews, meta


def _generate_meta(rng: np.random.Generator, item_ids: np.ndarray, meta: Path) -> None:
    """One metadata line per item, Amazon 2023's fields (images, features, description, details ...)."""
    titles = [json.dumps(t, ensure_ascii=False) for t in _sentences(rng, 20_000, 8)]
    blurbs = [json.dumps(t, ensure_ascii=False) for t in _sentences(rng, 20_000, 60)]
    stores = [json.dumps(t, ensure_ascii=False) for t in _sentences(rng, 2_000, 2)]
    cats = ['[]', '["Books", "Literature & Fiction", "Genre Fiction"]', '["Books", "Mystery, Thriller & Suspense"]',
            '["Books", "Children\'s Books", "Animals"]', '["Kindle Store", "Kindle eBooks", "Romance"]']
    image = ('{"thumb": "https://m.media-amazon.com/images/I/51Qh0cXwL._SX38_SY50_CR,0,0,38,50_.jpg", '
             '"large": "https://m.media-amazon.com/images/I/51Qh0cXwL.jpg", "variant": "MAIN", '
             '"hi_res": "https://m.media-amazon.com/images/I/81Qh0cXwL._SL1500_.jpg"}')
    tmp = meta.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        for start in range(0, len(item_ids), CHUNK):
            ids = item_ids[start:start + CHUNK]
            k = len(ids)
            t, b, s, c = (rng.integers(0, len(x), k) for x in (titles, blurbs, stores, cats))
            nimg, nfeat = rng.integers(1, 6, k), rng.integers(0, 4, k)
            avg, num, price = rng.integers(10, 51, k) / 10, rng.geometric(0.01, k), rng.integers(99, 5000, k) / 100
            ids, t, b, s, c, nimg, nfeat, avg, num, price = (
                x.tolist() for x in (ids, t, b, s, c, nimg, nfeat, avg, num, price))
            f.write("".join(
                f'{{"main_category": "Books", "title": {titles[t[j]]}, "subtitle": "Paperback \\u2013 {2000 + j % 24}", '
                f'"author": {{"avatar": "https://m.media-amazon.com/images/I/21Nz.jpg", "name": {stores[s[j]]}, '
                f'"about": [{blurbs[(b[j] + 1) % len(blurbs)]}]}}, "average_rating": {avg[j]}, '
                f'"rating_number": {num[j]}, "features": [{", ".join(blurbs[(b[j] + q) % len(blurbs)] for q in range(nfeat[j]))}], '
                f'"description": [{blurbs[b[j]]}], "price": {price[j] if j % 3 else "null"}, '
                f'"images": [{", ".join([image] * nimg[j])}], "videos": [], "store": {stores[s[j]]}, '
                f'"categories": {cats[c[j]]}, "details": {{"Publisher": {stores[s[j]]}, "Language": "English", '
                f'"Paperback": "{100 + j % 700} pages", "ISBN 10": "{ids[j].decode()}", '
                f'"Item Weight": "{j % 30 + 1}.{j % 10} ounces", "Dimensions": "5.5 x 0.8 x 8.2 inches"}}, '
                f'"parent_asin": "{ids[j].decode()}", "bought_together": null}}\n' for j in range(k)))
    tmp.rename(meta)


# --- measuring: one child process per (loader, size) --------------------------------------------------

# --- candidate parsers on the same file ------------------------------------------------------------

def parse_with(engine: str, reviews: str) -> dict:
    """Read the 2023 review fields of a dump with one candidate parser: the same gunzipped pieces (the
    loader's), then each parser's own way to the four columns. Only "msgspec" and "python" check every
    value as the loader must; the others read the typed columns they are given (no line numbers, nulls
    for absent fields and for nulls alike)."""
    import io

    sys.path.insert(0, str(REPO))
    import eval.loaders as loaders

    schema = {"user_id": "string", "parent_asin": "string", "rating": "float64", "timestamp": "float64"}
    if engine == "polars":
        import polars as pl

        types = {"string": pl.String, "float64": pl.Float64}
        parse = lambda data: pl.read_ndjson(io.BytesIO(data), schema={k: types[v] for k, v in schema.items()})  # noqa: E731
    elif engine == "duckdb":
        import duckdb

        con, columns = duckdb.connect(), {k: {"string": "VARCHAR", "float64": "DOUBLE"}[v] for k, v in schema.items()}
        parse = lambda data: con.read_json(io.BytesIO(data), format="newline_delimited",  # noqa: E731
                                           columns=columns).to_arrow_table()
    elif engine == "pyarrow":
        import pyarrow as pa
        import pyarrow.json as pj

        options = pj.ParseOptions(explicit_schema=pa.schema([(k, getattr(pa, v)()) for k, v in schema.items()]),
                                  unexpected_field_behavior="ignore")
        parse = lambda data: pj.read_json(io.BytesIO(data), parse_options=options)  # noqa: E731
    elif engine == "msgspec":
        parse = loaders._fast_reviews
    else:
        parse = lambda data: loaders._slow_reviews(Path(reviews), loaders._parse_lines(io.BytesIO(data), Path(reviews), 1))  # noqa: E731
    t, rows = time.perf_counter(), 0
    for data in loaders._pieces(Path(reviews)):
        got = parse(data)
        rows += len(got[0][0]) if engine == "msgspec" else len(got[0]) if engine == "python" else len(got)
    return {"engine": engine, "seconds": round(time.perf_counter() - t, 1), "rows": rows}


def parsers(args: argparse.Namespace) -> list[dict]:
    reviews, _ = generate(size(args.parsers), args.work / "data", args.seed)
    with open(reviews, "rb") as f:  # into the page cache, so the first parser does not pay the disk
        while f.read(1 << 24):
            pass
    out = []
    for engine in ("python", "msgspec", "polars", "pyarrow", "duckdb"):
        cmd = [sys.executable, __file__, "--measure", f"parse:{engine}", "--reviews", str(reviews)]
        proc = subprocess.run(["nice", "-n", "19", *cmd], capture_output=True, text=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r = {"engine": engine, **r}
        out.append(r)
        print(f"parser {engine:>8}: " + (f"{r['seconds']:6.1f} s, {r['rows']} rows, peak RSS {gb(r['peak_rss'])}"
                                          if "error" not in r else f"unavailable or failed ({r['error'][-120:]})"), flush=True)
    return out


def old_tree(work: Path) -> Path:
    """OLD_REF's `eval/` package, extracted once under `work` (imported first by the old loader's child)."""
    tree = work / f"old-{OLD_REF}"
    if not (tree / "eval" / "loaders.py").exists():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", OLD_REF, "eval"], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def child(args: argparse.Namespace) -> None:
    """Prepare the data set as `fusion prepare` does, timing the loader and prepare(); prints one JSON line."""
    if args.child.startswith("parse:"):
        return print(json.dumps(parse_with(args.child.split(":", 1)[1], args.reviews)))
    if args.child == "old":
        sys.path.insert(0, args.old_tree)
    else:
        sys.path.insert(0, str(REPO))
    import eval.dataset as dataset
    from eval.preprocess import PrepareConfig

    phases: dict[str, float] = {}

    def timed(name, fn):
        def call(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            phases[name] = round(time.perf_counter() - t, 1)
            return out
        return call

    dataset.load_source = timed("load", dataset.load_source)
    dataset.prepare = timed("prepare", dataset.prepare)
    dataset.attach_item_text = timed("item_text", dataset.attach_item_text)
    cfg = PrepareConfig(source=args.reviews, meta=args.meta or None, format="amazon" if args.meta else "auto",
                        negatives=[int(x) for x in args.negatives.split(",")])
    t = time.perf_counter()
    ds = dataset.prepare_dataset(cfg, args.run)
    print(json.dumps({"seconds": round(time.perf_counter() - t, 1), "phases": phases,
                      "counts": ds.manifest["counts"], "outputs_sha256": ds.manifest["outputs_sha256"]}))


def measure(args: argparse.Namespace) -> None:
    """Run the child and report its peak RSS (RUSAGE_CHILDREN: this process has no other child)."""
    cmd = [sys.executable, __file__, "--child", args.measure, "--reviews", args.reviews, "--meta", args.meta or "",
           "--run", args.run or "", "--negatives", args.negatives, "--old-tree", args.old_tree or ""]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    lines = proc.stdout.strip().splitlines()
    got = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": proc.stderr.strip()[-2000:]}
    print(json.dumps({**got, "peak_rss": peak, "returncode": proc.returncode}))


def run_one(which: str, reviews: Path | str, meta: Path | str, run: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--measure", which, "--reviews", str(reviews), "--meta", str(meta),
           "--run", str(run), "--negatives", args.negatives, "--old-tree", str(old_tree(args.work))]
    t = time.perf_counter()
    proc = subprocess.run(["nice", "-n", "19", *cmd], capture_output=True, text=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall"] = round(time.perf_counter() - t, 1)
    return out


def size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("KM")) * scale)


def label(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}K"


def machine() -> dict:
    from slim.hardware import detect

    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    return {"cpu": cpu, "cores": os.cpu_count(), "flags": detect().isa_flags(), "commit": commit,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def shipped(args: argparse.Namespace) -> None:
    """prepare's outputs on the shipped data sets (RecBole files: prepare changed, not their reader)."""
    for name in ("ml-100k", "ml-1m"):
        got = {}
        for which in ("old", "new"):
            run = args.work / f"run-{which}-{name}"
            subprocess.run(["rm", "-rf", str(run)], check=True)
            got[which] = run_one(which, name, "", run, args)
            subprocess.run(["rm", "-rf", str(run)], check=True)
        same = got["old"].get("outputs_sha256") == got["new"].get("outputs_sha256") is not None
        print(f"shipped {name}: same output {'yes' if same else 'NO'} (old {got['old'].get('seconds')} s, "
              f"{gb(got['old']['peak_rss'])}; new {got['new'].get('seconds')} s, {gb(got['new']['peak_rss'])})",
              flush=True)


PARALLEL_SETTINGS = {"data_parallel_size": ("slim-teacher-rationales", "slim-student-rationales"),
                     "processes": ("vectors",)}  # what runs on N engines or workers besides the training stages


def global_batch_sets(preset: str, nproc: int) -> list[str]:
    """`--set`s that divide every training stage's batch size by `nproc`: a batch is per process, so
    these keep the preset's global batch (and its optimizer steps) on `nproc` processes."""
    sys.path.insert(0, str(REPO))
    from eval.config import config_dict
    from fusion.pipeline import TRAINING, build_stages

    def sizes(settings: dict, prefix: str):
        for key, value in settings.items():
            if isinstance(value, dict):
                yield from sizes(value, f"{prefix}{key}.")
            elif key == "batch_size":
                yield f"{prefix}{key}", value

    sets = []
    for stage in build_stages(Path("/nonexistent"), preset):
        if isinstance(stage, TRAINING):
            for path, size in sizes(config_dict(stage.config), f"{stage.folder.replace('/', '.')}."):
                if size % nproc:
                    raise SystemExit(f"{path} = {size} does not divide into {nproc} processes")
                sets.append(f"{path}={size // nproc}")
    return sets


def pipeline_run(run: Path, preset: str, nproc: int, keep_global_batch: bool = False) -> list[dict]:
    """`fusion run` of `preset` into `run` (from scratch) on `nproc` processes; its pipeline log."""
    subprocess.run(["rm", "-rf", str(run)], check=True)
    sets = [] if nproc == 1 else [f"{table}.{key}={nproc}" for key, tables in PARALLEL_SETTINGS.items()
                                  for table in tables]
    if nproc > 1 and keep_global_batch:
        sets += global_batch_sets(preset, nproc)
    cmd = [sys.executable, "-m", "fusion.cli", "run", "--preset", preset, "--run", str(run), "--nproc", str(nproc),
           *(a for s in sets for a in ("--set", s))]
    print(f"$ {' '.join(cmd[1:])}  (load average {os.getloadavg()[0]:.2f})", flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    return json.loads((run / "pipeline.json").read_text())["stages"]


def same_models(one: Path, many: Path) -> list[dict]:
    """Per-user test NDCG@10 and MRR of every model in both reports, paired user by user (each seed's
    run for a model trained with several), p-values Holm-adjusted over the whole family."""
    sys.path.insert(0, str(REPO))
    from eval.metrics import per_user
    from eval.significance import adjust, paired_test

    a, b = np.load(one / "report" / "ranks.npz"), np.load(many / "report" / "ranks.npz")
    rows = []
    for name in sorted(set(a.files) & set(b.files)):
        # the shipped tested metrics (NDCG@10, MRR) read only the rank, not the candidate count
        va, vb = per_user(a[name], 1, tested=True), per_user(b[name], 1, tested=True)
        for metric in va:
            test = paired_test(va[metric].ravel(), vb[metric].ravel())
            rows.append({"model": name, "metric": metric, "one": float(va[metric].mean()),
                         "many": float(vb[metric].mean()), "identical_ranks": bool(np.array_equal(a[name], b[name])),
                         **test})
    for row, q in zip(rows, adjust(np.array([r["p"] for r in rows]), "holm")):
        row["p_holm"] = float(q)
    return rows


def stages(args: argparse.Namespace) -> dict:
    """Each stage's seconds on 1 and on --nproc processes, and whether the two runs' models differ."""
    sys.path.insert(0, str(REPO))
    from slim.engine import vllm_status

    if args.nproc < 2:
        raise SystemExit("--stages compares 1 process with --nproc of them: --nproc must be at least 2")
    status = vllm_status()
    if not status.ok:  # the generation stages' data-parallel engines are vLLM's
        raise SystemExit(f"--stages runs the rationale stages on {args.nproc} vLLM engines; vLLM cannot run here: "
                         f"{status.reason}")
    logs = {n: pipeline_run(args.work / f"stages-{n}", args.preset, n, args.keep_global_batch)
            for n in (1, args.nproc)}
    print(f"\n{'stage':<32}{'1 process':>11}{f'{args.nproc} processes':>14}{'speed-up':>10}  runs on")
    rows = []
    for first, second in zip(logs[1], logs[args.nproc]):
        parallel = "processes" in second or any(first["stage"] in t for t in PARALLEL_SETTINGS.values())
        rows.append({"stage": first["stage"], "seconds_1": first["seconds"], f"seconds_{args.nproc}": second["seconds"],
                     "parallel": parallel})
        print(f"{first['stage']:<32}{first['seconds']:>10.1f}s{second['seconds']:>13.1f}s"
              f"{first['seconds'] / max(second['seconds'], 1e-9):>9.2f}x  "
              f"{f'{args.nproc} processes' if parallel else 'one process either way'}")
    models = same_models(args.work / "stages-1", args.work / f"stages-{args.nproc}")
    print(f"\n{'model':<28}{'metric':>9}{'1 process':>11}{f'{args.nproc} processes':>14}{'diff':>10}"
          f"{'p (Holm)':>10}  identical ranks")
    for r in models:
        print(f"{r['model']:<28}{r['metric']:>9}{r['one']:>11.4f}{r['many']:>14.4f}{r['diff']:>+10.4f}"
              f"{r['p_holm']:>10.3f}  {'yes' if r['identical_ranks'] else 'no'}")
    return {"stages": rows, "models": models}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,5M,20M", help="review counts, ascending (K and M suffixes)")
    ap.add_argument("--old-max", default="5M", help="the old loader runs up to this many reviews")
    ap.add_argument("--budget", type=float, default=600.0,
                    help="skip a size whose new-loader run, scaled linearly from the last size, would exceed this (s)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-scale"), help="dumps, runs and the old tree")
    ap.add_argument("--negatives", default="100,999", help="candidate list sizes (the paper preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--parsers", metavar="SIZE", help="only compare the candidate parsers on a dump of SIZE reviews")
    ap.add_argument("--stages", action="store_true", help="only the pipeline's stages on 1 and --nproc processes")
    ap.add_argument("--preset", default="demo", help="--stages: the preset whose pipeline runs")
    ap.add_argument("--nproc", type=int, default=2, help="--stages: processes of the second run")
    ap.add_argument("--keep-global-batch", action="store_true",
                    help="--stages: divide each training stage's batch size (per process) by --nproc in the "
                         "second run, so both runs take the same optimizer steps")
    ap.add_argument("--shipped", action=argparse.BooleanOptionalAction, default=True,
                    help="first compare old and new outputs on the shipped data sets (ml-100k, ml-1m)")
    for internal in ("--child", "--measure", "--reviews", "--meta", "--run", "--old-tree"):
        ap.add_argument(internal, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.measure:
        return measure(args)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB; flags: {info['flags']}; "
          f"commit {info['commit']}; load average {os.getloadavg()[0]:.2f}", flush=True)
    if args.stages:
        found = stages(args)
        if args.json:
            args.json.write_text(json.dumps({"machine": info, **found}, indent=1))
        return
    if args.parsers:
        found = parsers(args)
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "parsers": found}, indent=1))
        return
    sizes, old_max, results = [size(s) for s in args.sizes.split(",")], size(args.old_max), []
    if args.shipped:
        shipped(args)
    print(f"{'reviews':>8} {'loader':>6} {'seconds':>8} {'load':>6} {'prepare':>8} {'peak RSS':>10}  "
          f"{'users':>8} {'items':>8} {'kept':>9}  same output", flush=True)
    for n in sizes:
        done = [r for r in results if r["loader"] == "new" and "error" not in r]
        if done and done[-1]["seconds"] * n / done[-1]["reviews"] > args.budget:
            print(f"{label(n):>8} skipped: {label(done[-1]['reviews'])} took {done[-1]['seconds']:.0f} s, so this "
                  f"would take about {done[-1]['seconds'] * n / done[-1]['reviews']:.0f} s (> --budget {args.budget:g})",
                  flush=True)
            continue
        t = time.perf_counter()
        reviews, meta = generate(n, args.work / "data", args.seed)
        gen = round(time.perf_counter() - t, 1)
        digests = {}
        for which in ("old", "new") if n <= old_max else ("new",):
            run = args.work / f"run-{which}-{label(n)}"
            subprocess.run(["rm", "-rf", str(run)], check=True)
            r = {"reviews": n, "loader": which, "generate_seconds": gen, "load_average": os.getloadavg()[0],
                 "reviews_gz_bytes": reviews.stat().st_size, "meta_gz_bytes": meta.stat().st_size,
                 **run_one(which, reviews, meta, run, args)}
            results.append(r)
            if "error" in r:
                print(f"{label(n):>8} {which:>6} failed: {r['error'][-300:]}", flush=True)
                continue
            digests[which] = r["outputs_sha256"]
            c = r["counts"]
            same = "" if which == "old" else ("yes" if digests.get("old") == r["outputs_sha256"] else
                                              "no" if "old" in digests else "(no old run)")
            r["same_output"] = same
            print(f"{label(n):>8} {which:>6} {r['seconds']:8.1f} {r['phases'].get('load', 0):6.1f} "
                  f"{r['phases'].get('prepare', 0):8.1f} {gb(r['peak_rss']):>10}  {c['users']:>8} {c['items']:>8} "
                  f"{c['interactions']:>9}  {same}", flush=True)
            subprocess.run(["rm", "-rf", str(run)], check=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
