"""`fusion evaluate`: every trained model of a run, judged on the same candidates, in one report.

Overall metrics under every protocol; on the analysis protocol (full ranking by default) also user
groups by history length (cold start, SLIM Fig. 5), test items by training popularity, popularity
bias of the top 10 (SLIM Fig. 6) and efficiency. Writes metrics.json, report.md and PNG plots.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from rich.console import Console

from eval.config import setting
from eval.dataset import SeqDataset, load_dataset
from eval.errors import InputError
from eval.evaluate import Ranking, metrics_of, protocol_label, protocols_of, rank_users, rows_of
from eval.io import MANIFEST, METRICS_FILE, REPORT, read_json, write_json
from eval.popularity import popularity_metrics
from eval.registry import MODELS, load_model, max_len_of, model_type
from eval.scoring import CachedScorer
from eval.metrics import per_user, tested_metrics
from eval.significance import ALPHA, CORRECTIONS, adjust, paired_test, seeds_test
from eval.stage import DATA, Stage
from eval.tables import floor_of, markdown_table, print_table
from slim.quality import QualityStage, quality_section

from .groups import item_groups, item_popularity_groups, user_groups
from .train import GROUP_KEY, SEED_RANKS, SEEDS

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EFF_COLUMNS = ["parameters", "trainable_parameters", "train_seconds", "users_per_s"]


@dataclass(frozen=True)
class ReportConfig:
    analysis_protocol: str = setting("full", "Protocol of the group, popularity and efficiency analyses: full "
                                             "or a candidate size (e.g. 999).")
    correction: str = setting("holm", "Adjustment of the paired comparisons' p-values over all of the report's "
                                      "tests: holm (family-wise error) or bh (Benjamini-Hochberg, false "
                                      "discovery rate).")

    def __post_init__(self) -> None:
        if self.correction not in CORRECTIONS:
            raise InputError(f"report correction must be one of {', '.join(CORRECTIONS)}, not {self.correction!r}")


def find_models(run: Path) -> dict[str, Path]:
    """Finished model folders of a run (a stage's manifest and a registered model_type), by name.

    Other model folders (a merged LLM served for generation) are not recommenders and are passed over;
    a model folder whose config.json is unreadable is an error, not a silent omission."""
    found = {}
    for cfg in sorted(run.glob("**/config.json")):
        rel = cfg.parent.relative_to(run)
        if any(part.startswith(".") for part in rel.parts) or not (cfg.parent / MANIFEST).exists():
            continue
        if model_type(cfg.parent) in MODELS:
            found[str(rel)] = cfg.parent
    return found


def group_row(ranking: Ranking, users: np.ndarray) -> dict[str, float]:
    """A group's metrics and the median rank of its targets (1 = first): on a small group such as the
    rare items NDCG@10 reads 0 until a target enters the top 10, the median shows how far off it is."""
    rows = ranking.rows(users)
    if not len(rows):
        return metrics_of(ranking, rows)
    median = float(np.median(ranking.ranks[rows])) + 1
    return {**metrics_of(ranking, rows), "median rank": int(median) if median.is_integer() else median}


def analyse(model, ds: SeqDataset, protocol: str, max_len: int) -> dict:
    """Overall, per-group and popularity-bias results of one model under one protocol."""
    t0 = time.perf_counter()
    ranking = rank_users(model, ds, "test", protocol, max_len=max_len)
    users_per_s = len(ranking.ranks) / (time.perf_counter() - t0)
    tail = item_popularity_groups(ds)["tail"]
    top = ranking.top
    return {
        "ranks": ranking.ranks,
        "candidates": ranking.candidates,
        "overall": metrics_of(ranking),
        "users_per_s": users_per_s,
        "user_groups": {k: group_row(ranking, g) for k, g in user_groups(ds).items()},
        "item_groups": {k: group_row(ranking, g) for k, g in item_groups(ds).items()},
        "popularity": popularity_metrics(top, ds.target("test")[ranking.users], ds.item_popularity, ds.num_users,
                                         tail),
        "exposure@10": np.bincount(top[:, :10][top[:, :10] > 0], minlength=ds.num_items + 1).tolist(),
    }


def baseline_of(name: str, path: Path, models: dict[str, Path]) -> str | None:
    """The model a report compares `name` with: a fused model's backbone (text matching: SASRec),
    the SLMRec student's teacher."""
    config = read_json(path / MANIFEST).get("config", {})
    if name.startswith("fusion/"):
        return config.get("backbone") if config.get("mode") == "hybrid" else "sasrec"
    return {"slmrec-student": "slmrec-teacher"}.get(name)


def _fusion_settings(path: Path) -> dict:
    """The settings that tell two hybrids apart (defaults for models trained before they existed)."""
    c = read_json(path / MANIFEST).get("config", {})
    return {"mode": c.get("mode"), "backbone": c.get("backbone"), "training": c.get("training", "frozen"),
            "text": c.get("text", "both"), "vectors": c.get("vectors", "vectors")}


def controls_of(name: str, models: dict[str, Path]) -> list[str]:
    """The run's fused models that differ from hybrid `name` in one thing that isolates what text adds:
    the same model without text (text = none), and the same one over the profile control's vectors."""
    if not name.startswith("fusion/"):
        return []
    mine = _fusion_settings(models[name])
    if mine["mode"] != "hybrid":
        return []
    out = []
    for other, path in models.items():
        theirs = _fusion_settings(path) if other.startswith("fusion/") and other != name else None
        if theirs is None:
            continue
        diff = {k for k in mine if mine[k] != theirs[k]}
        if (diff == {"text"} and theirs["text"] == "none") or \
                (diff == {"vectors"} and mine["vectors"] == "vectors" and mine["text"] in ("both", "users")):
            out.append(other)
    return out


def seed_rows(models: dict[str, Path], protocol: str) -> dict[str, dict[str, str]]:
    """Mean +- std over seeds of the fused models trained with several (their seeds.json): overall under
    `protocol`, and NDCG@10 under full ranking in the groups the stage scored every seed on."""
    rows = {}
    label = protocol_label(protocol)
    for name, path in models.items():
        file = path / SEEDS
        summary = read_json(file) if file.exists() else {}
        if summary.get("seeds", 1) > 1:
            mean, std = summary["mean"], summary["std"]
            row = {"seeds": str(summary["seeds"]),
                   **{m: f"{mean[label][m]:.4f} ± {std[label][m]:.4f}" for m in tested_metrics() if m in mean[label]}}
            for key in mean:  # "full ranking, <group>" (seeds.json written before groups were added: none)
                if key.startswith(GROUP_KEY) and "NDCG@10" in mean[key]:
                    value = f"{mean[key]['NDCG@10']:.4f} ± {std[key]['NDCG@10']:.4f}"
                    row[f"{key.removeprefix(GROUP_KEY)} NDCG@10"] = value
            rows[name] = row
    return rows


def seed_ranks(path: Path, protocol: str) -> np.ndarray | None:
    """Every seed's per-user test ranks [seeds, users] of a model trained with several seeds, else None."""
    file = path / SEED_RANKS
    if not file.exists():
        return None
    with np.load(file) as saved:
        ranks = saved[protocol] if protocol in saved.files else None
    return ranks if ranks is not None and len(ranks) > 1 else None


def _pair_test(va: np.ndarray, vb: np.ndarray, users: np.ndarray) -> dict:
    """Over seeds and users when va and vb are [seeds, users] (and the group has 2 users to cross with
    the seeds), else over the users of one run each (the first seed's)."""
    if va.ndim == 1:
        return {**paired_test(va[users], vb[users]), "seeds": 1}
    if len(users) < 2:
        return {**paired_test(va[0, users], vb[0, users]), "seeds": 1}
    return seeds_test(va[:, users], vb[:, users])


def compare(ranks: dict[str, np.ndarray], candidates: np.ndarray, pairs: list[tuple[str, str]], ds: SeqDataset,
            correction: str = "holm") -> dict:
    """Paired tests of the tested metrics (`eval.metrics`: NDCG@10 and MRR) for each (model, baseline)
    pair, overall and in every group; `candidates`: each tested user's candidate count.

    `ranks` holds per-user test ranks: [users] for a model trained once, [seeds, users] for one trained
    with several seeds; two models with the same number of seeds are tested over seeds and users
    (`seeds_test`), any other pair over the users of one run each. Every p-value is then adjusted over
    the whole family of the report's tests, and only an adjusted one below ALPHA is significant."""
    tested = ds.eval_users("test")  # the users every rank array holds, in order
    groups = {"overall": np.arange(len(tested)),
              **{name: rows_of(tested, g) for name, g in {**user_groups(ds), **item_groups(ds)}.items()}}
    out = {}
    for a, b in pairs:
        ra, rb = ranks[a], ranks[b]
        if ra.shape != rb.shape:  # seeds on one side only: compare the runs kept
            ra, rb = ra.reshape(-1, len(tested))[0], rb.reshape(-1, len(tested))[0]
        va, vb = per_user(ra, candidates, tested=True), per_user(rb, candidates, tested=True)
        out[f"{a} vs {b}"] = {g: {m: _pair_test(va[m], vb[m], users) for m in va} for g, users in groups.items()}
    tests = [t for found in out.values() for by_metric in found.values() for t in by_metric.values()]
    for t, q in zip(tests, adjust(np.array([t["p"] for t in tests]), correction)):
        t["p_adjusted"], t["significant"] = float(q), bool(q < ALPHA)
    return out


def selection_scores(models: dict[str, Path], ds: SeqDataset, protocol: str) -> dict[str, dict[str, float]]:
    """Validation metrics of each model on every user under one protocol: what chooses among models
    trained with different selection settings (a user group, a validation sample) on equal terms."""
    out = {}
    for name, path in models.items():
        m = metrics_of(rank_users(CachedScorer(load_model(path)), ds, "valid", protocol, max_len=max_len_of(path)))
        out[name] = {k: m[k] for k in ("users", "NDCG@10", "MRR")}
    return out


def best_by_selection(scores: dict[str, dict[str, float]]) -> str:
    return max(scores, key=lambda name: scores[name]["MRR"])


def _efficiency(path: Path, model: CachedScorer, users_per_s: float) -> dict[str, float | None]:
    counts = read_json(path / MANIFEST).get("counts", {})
    params = sum(p.numel() for p in model.model.parameters())
    trainable = counts.get("trainable_parameters", sum(p.numel() for p in model.model.parameters() if p.requires_grad))
    return {"parameters": counts.get("parameters", params), "trainable_parameters": trainable,
            "train_seconds": counts.get("train_seconds"), "users_per_s": round(users_per_s, 1)}


class ReportStage(Stage):
    """Score every model of the run on the same fixed candidates and full ranking; writes RUN/report
    (metrics.json, report.md, PNG plots)."""

    name = "report"
    config_class = ReportConfig

    def inputs(self) -> dict[str, Path]:
        models = find_models(self.run)
        if not models:
            raise InputError(f"{self.run}: no trained models found")
        quality = self.run / QualityStage.name
        return {"data": self.data_dir, **models, **({"quality": quality} if quality.exists() else {})}

    def build(self, out: Path) -> dict:
        results = evaluate_run(self.run, out, self.config.analysis_protocol, self.config.correction)
        return {"models": len(results["efficiency"])}


def evaluate_run(run: str | Path, out: str | Path, analysis_protocol: str = "full", correction: str = "holm") -> dict:
    """Score every model of `run`; write metrics.json, report.md and plots to `out`; return the results."""
    run, out = Path(run), Path(out)
    ds = load_dataset(run / DATA)
    models = find_models(run)
    if not models:
        raise InputError(f"{run}: no trained models found")
    protocols = protocols_of(ds)
    if analysis_protocol not in protocols:
        raise InputError(f"analysis protocol {analysis_protocol!r} not prepared for {run / 'data'}")
    results: dict = {"data": ds.fingerprint, "analysis_protocol": analysis_protocol, "overall": {},
                     "user_groups": {}, "item_groups": {}, "popularity": {}, "efficiency": {}, "exposure@10": {}}
    ranks: dict[str, np.ndarray] = {}
    for name, path in models.items():
        model = CachedScorer(load_model(path))  # one pass over the users serves every protocol
        max_len = max_len_of(path)
        for protocol in sorted(protocols, key=lambda p: p != analysis_protocol):  # time it before the cache fills
            if protocol == analysis_protocol:
                a = analyse(model, ds, protocol, max_len)
                candidates = a["candidates"]  # the same for every model: a property of the protocol
                seeded = seed_ranks(path, protocol)
                ranks[name] = a["ranks"] if seeded is None else seeded
                results["overall"].setdefault(protocol, {})[name] = a["overall"]
                for key in ("user_groups", "item_groups", "popularity", "exposure@10"):
                    results[key][name] = a[key]
                results["efficiency"][name] = _efficiency(path, model, a["users_per_s"])
            else:
                results["overall"].setdefault(protocol, {})[name] = metrics_of(
                    rank_users(model, ds, "test", protocol, max_len=max_len))
    pairs = [(a, b) for a, path in models.items() if (b := baseline_of(a, path, models)) in models]
    pairs += [(a, b) for a in models for b in controls_of(a, models)]
    results["comparisons"] = compare(ranks, candidates, pairs, ds, correction)
    results["correction"] = correction
    results["seeds"] = seed_rows(models, analysis_protocol)
    fused = {name: path for name, path in models.items() if name.startswith("fusion/")}
    results["selection"] = selection_scores(fused, ds, analysis_protocol) if fused else {}
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "ranks.npz", **ranks)  # per-user test ranks ([seeds, users] if seeded): further analyses
    write_json(out / METRICS_FILE, results)
    (out / REPORT).write_text(markdown_report(results, ds) + quality_section(run))
    plot(results, ds, out)
    return results


def _by_group(results: dict, key: str, metric: str) -> dict[str, dict[str, float]]:
    """model -> {group: metric} rows for a Markdown/terminal table."""
    return {name: {g: m.get(metric) for g, m in groups.items()} for name, groups in results[key].items()}


def markdown_report(results: dict, ds: SeqDataset) -> str:
    """The report as Markdown; the overall tables are also printed to the terminal."""
    ap = results["analysis_protocol"]
    tested = len(ds.eval_users("test"))
    users = f"{ds.num_users} users" + (f" ({tested} with a test target)" if tested < ds.num_users else "")
    parts = ["# Evaluation report", "", f"{users}, {ds.num_items} items; test split, ties broken at random by a "
             f"fixed draw per user. Analyses below use {protocol_label(ap)}."]
    for protocol, rows in results["overall"].items():
        floor = floor_of(next(iter(rows.values())))
        parts += ["", f"## Overall: {protocol_label(protocol)}", "", markdown_table(rows, floor=floor)]
        print_table(f"test: {protocol_label(protocol)}", rows, floor=floor)
    for key, title in (("user_groups", "Users by history length (G1 = shortest)"),
                       ("item_groups", "Test items by training popularity")):
        some = next(iter(results[key].values()))
        sizes = {g: m["users"] for g, m in some.items()}
        parts += ["", f"## {title}", "", "users per group: " + ", ".join(f"{g}: {n}" for g, n in sizes.items())]
        for metric in ("NDCG@10", "HR@10", "median rank"):
            rows = _by_group(results, key, metric)
            parts += ["", f"{metric}:", "", markdown_table(rows, columns=list(sizes))]
            if metric == "NDCG@10":
                print_table(f"{title}: {metric}", rows, columns=list(sizes))
    parts += nonfinite_lines(results)
    if results["comparisons"]:
        parts += ["", "## Paired comparisons (A - B over the same test users)", "", comparisons_note(results),
                  "", comparisons_table(results["comparisons"])]
    if results.get("selection"):
        scores = results["selection"]
        parts += ["", f"## Model selection (validation, every user, {protocol_label(ap)})", "",
                  f"The service's default model: **{best_by_selection(scores)}**, the fused model with the best "
                  "validation MRR when every candidate is scored on the same users and protocol.", "",
                  markdown_table(scores, columns=["users", "NDCG@10", "MRR"])]
    if results.get("seeds"):
        parts += ["", f"## Fused models over several seeds ({protocol_label(ap)}, test)", "",
                  "Mean ± std over seeds; the model scored above is the first seed's. Group columns: NDCG@10 "
                  "under full ranking on the sparsest users, tail items and rare items.", "",
                  markdown_table(results["seeds"], columns=list(dict.fromkeys(
                      c for row in results["seeds"].values() for c in row)))]
    pop_columns = list(next(iter(results["popularity"].values())))
    parts += ["", "## Popularity bias of the top 10", "", markdown_table(results["popularity"], columns=pop_columns),
              "", "## Efficiency", "", markdown_table(results["efficiency"], columns=EFF_COLUMNS)]
    print_table("popularity bias (top 10)", results["popularity"], columns=pop_columns)
    print_table("efficiency", results["efficiency"], columns=EFF_COLUMNS)
    parts += ["", "![users by history length](user_groups.png)", "![items by popularity](item_groups.png)",
              "![popularity of recommended items](popularity.png)"]
    return "\n".join(parts) + "\n"


def nonfinite_lines(results: dict) -> list[str]:
    """A warning per model whose scores were NaN or infinite for some users (their truth ranked last)."""
    lines = []
    for protocol, rows in results["overall"].items():
        for name, m in rows.items():
            if m.get("nonfinite_users"):
                lines.append(f"- **{name}** ({protocol_label(protocol)}): {m['nonfinite_users']} of {m['users']} "
                             "users had a NaN or infinite score; their true item is ranked last.")
                Console(width=160).print(f"[yellow]warning:[/] {lines[-1][2:].replace('**', '')}")
    return ["", "## Warnings", "", *lines] if lines else []


def comparisons_note(results: dict) -> str:
    tests = sum(len(by_metric) for found in results["comparisons"].values() for by_metric in found.values())
    method = {"holm": "Holm's step-down method (family-wise error)",
              "bh": "the Benjamini-Hochberg method (false discovery rate)"}[results.get("correction", "holm")]
    return ("Difference of the means, its 95 % interval and p-value as tested, then the p-value adjusted over "
            f"all {tests} tests of this table by {method}; **bold**: adjusted p < {ALPHA}. seeds = 1: one trained "
            "model each, a paired t-test over users (a single run: training noise is not in the test). seeds = k: "
            "both models trained with k seeds, seeds and users crossed random effects (a two-way ANOVA t-test).")


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"


def _cell(t: dict) -> str:
    text = f"{t['diff']:+.4f} [{t['low']:+.4f}, {t['high']:+.4f}] p={_p(t['p'])} adj. {_p(t['p_adjusted'])}"
    return f"**{text}**" if t["significant"] else text


def comparisons_table(comparisons: dict) -> str:
    """One row per comparison and user/item group: users, seeds, then each tested metric's difference."""
    metrics = list(next(iter(next(iter(comparisons.values())).values())))
    lines = ["| A vs B | group | users | seeds | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 4) + "|"]
    for pair, groups in comparisons.items():
        for group, tests in groups.items():
            first = tests[metrics[0]]
            lines.append(f"| {pair} | {group} | {first['users']} | {first['seeds']} | "
                         + " | ".join(_cell(tests[m]) for m in metrics) + " |")
    return "\n".join(lines)


def _bars(ax, rows: dict[str, dict[str, float]], title: str) -> None:
    groups = list(next(iter(rows.values())))
    width = 0.8 / len(rows)
    for i, (name, vals) in enumerate(rows.items()):
        ax.bar(np.arange(len(groups)) + i * width, [vals[g] or 0 for g in groups], width, label=name)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=15, fontsize=8)
    ax.set_title(title)
    ax.legend(fontsize=7)


def plot(results: dict, ds: SeqDataset, out: Path) -> None:
    """Group bar charts (SLIM Fig. 5) and recommended vs training popularity (SLIM Fig. 6)."""
    for key, title in (("user_groups", "NDCG@10 by user history length"),
                       ("item_groups", "NDCG@10 by test-item popularity")):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        _bars(ax, _by_group(results, key, "NDCG@10"), title)
        fig.tight_layout()
        fig.savefig(out / f"{key}.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 5))
    pop = ds.item_popularity[1:]
    for name, exposure in results["exposure@10"].items():
        shown = np.asarray(exposure[1:])
        keep = shown > 0
        ax.scatter(pop[keep] + 1, shown[keep], s=6, alpha=0.5, label=name)
    ax.set(xscale="log", yscale="log", xlabel="item popularity in training (+1)",
           ylabel="times recommended in a top 10", title="Popularity of recommended items")
    ax.legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    fig.savefig(out / "popularity.png", dpi=120)
    plt.close(fig)
