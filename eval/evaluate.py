"""One function that scores any model on fixed candidates or full ranking.

A model is anything with `score(users, histories, candidates) -> scores`: users [B], histories
[B, L] left-padded with 0, candidates [B, C] item ids (0 = padding) or None for all items, in which
case it returns [B, num_items + 1] (column 0, padding, is ignored). Full ranking never holds that
[users, items] matrix for a dot-product model (`eval.scoring.DotScorer`): it scores a block of items at
a time and adds up the counts against the true item and a running top-20, with the same results.
"""
from __future__ import annotations

import time
from typing import NamedTuple, Protocol

import numpy as np
import torch
from rich.progress import track

from .dataset import SeqDataset, pad_left
from .errors import InputError
from .metrics import count_against, from_ranks, nonfinite_rows, random_floor, rank_of, ranks, top_k
from .scoring import item_scorer


class Scorer(Protocol):
    def score(self, users: torch.Tensor, histories: torch.Tensor,
              candidates: torch.Tensor | None) -> torch.Tensor: ...


def protocol_label(protocol: str) -> str:
    return "full ranking" if protocol == "full" else f"{protocol} negatives"


def protocols_of(ds: SeqDataset) -> list[str]:
    """The protocols a data set supports: each persisted candidate size (largest first), then full ranking."""
    sizes = sorted((int(p.stem.rsplit("_", 1)[1]) for p in ds.path.glob("candidates_test_*.npy")), reverse=True)
    return [str(n) for n in sizes] + ["full"]


class Ranking(NamedTuple):
    """Per-user results of one model on one split and protocol."""

    ranks: np.ndarray      # 0-based rank of the true item (`eval.metrics.ranks`)
    candidates: np.ndarray  # valid candidates, truth included
    top: np.ndarray        # the top-20 recommended items (0 pads shorter lists); full ranking: of equal
    #                        scores, the smaller item id first
    nonfinite: np.ndarray  # a NaN or infinite score among the user's candidates (truth ranked last)
    users: np.ndarray      # the users ranked, in the order of the arrays above

    def rows(self, users: np.ndarray) -> np.ndarray:
        """Positions in this ranking of those of `users` it ranked (a group's rows)."""
        return rows_of(self.users, users)


def rows_of(ranked: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Positions in `ranked` (the users of a ranking, in order) of those of `users` it holds."""
    return np.flatnonzero(np.isin(ranked, users))


# full ranking holds one block of scores at a time: batch users x chunk items, this many (64 MiB of float32)
SCORE_BUDGET = 1 << 24
TOP = 20  # items recommended per user (`Ranking.top`)


def default_chunk(batch_size: int) -> int:
    """Items scored at once in full ranking: SCORE_BUDGET / batch_size, at least 1,024."""
    return max(1024, SCORE_BUDGET // max(batch_size, 1))


@torch.no_grad()
def rank_users(model: Scorer, ds: SeqDataset, split: str = "test", protocol: str = "100",
               users: np.ndarray | None = None, batch_size: int = 256, max_len: int = 200,
               progress: bool = False, chunk_size: int | None = None, shard: bool = True) -> Ranking:
    """Per-user ranks, candidate counts, top-20 recommended items and non-finite flags of `users`
    (default: every user with a target in `split`).

    Full ranking scores `chunk_size` items at a time (default `default_chunk(batch_size)`), so memory
    does not grow with the catalogue; the results do not depend on it. With torch.distributed
    initialised on several processes (unless `shard` is False), each process ranks its own slice of
    the users and every process returns the whole, gathered ranking: then every process must call it."""
    users = ds.eval_users(split) if users is None else np.asarray(users)
    targets = ds.target(split)
    if not targets[users].all():
        raise InputError(f"{int((targets[users] == 0).sum())} of the users asked for have no {split} target")
    chunk = default_chunk(batch_size) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise InputError(f"chunk_size must be at least 1, not {chunk}")
    world, rank = _world() if shard else (1, 0)
    mine = np.array_split(users, world)[rank]
    fixed = None if protocol == "full" else ds.candidates(split, int(protocol))
    width = min(TOP, ds.num_items + 2 if fixed is None else fixed.shape[1])
    out = [np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, width), np.int64), np.zeros(0, bool)]
    parts = [out]
    batches = range(0, len(mine), batch_size)
    for start in (track(batches, description=f"scoring {split}/{protocol}") if progress and rank == 0 else batches):
        u = mine[start:start + batch_size]
        hist = [ds.history(int(x), split) for x in u]
        if fixed is None:
            parts.append(_rank_full(model, u, hist, pad_left(hist, max_len), targets[u], ds.num_items, chunk))
        else:
            parts.append(_rank_candidates(model, u, pad_left(hist, max_len), torch.as_tensor(fixed[u])))
    local = [np.concatenate([p[i] for p in parts]) for i in range(4)]
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, local)
        local = [np.concatenate([g[i] for g in gathered]) for i in range(4)]
    return Ranking(*local, users)


def _world() -> tuple[int, int]:
    """(world size, this process's rank) of torch.distributed, (1, 0) where it is not initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _rank_candidates(model: Scorer, u: np.ndarray, histories: torch.Tensor, cand: torch.Tensor) -> list[np.ndarray]:
    """Ranks, candidate counts, top items and non-finite flags of one batch on fixed candidates [B, C]
    (the truth in column 0, 0 = padding)."""
    scores = model.score(torch.as_tensor(u), histories, cand).float()
    valid = (cand > 0).to(scores.device)
    cand = cand.to(scores.device)
    r = ranks(scores, valid, u)
    bad = nonfinite_rows(scores, valid)
    if bad.any():  # nothing recommended from a NaN or infinite score
        scores = scores.nan_to_num(nan=float("-inf"), posinf=float("-inf"))
    masked = scores.masked_fill(~valid, float("-inf"))
    best = masked.topk(min(TOP, masked.shape[1]), dim=1)
    top = torch.gather(cand, 1, best.indices).masked_fill(best.values == float("-inf"), 0)
    return [x.cpu().numpy() for x in (r, valid.sum(dim=1), top, bad)]  # 0 pads lists shorter than 20


def _rank_full(model: Scorer, u: np.ndarray, hist: list[np.ndarray], histories: torch.Tensor,
               targets: np.ndarray, num_items: int, chunk: int) -> list[np.ndarray]:
    """`_rank_candidates` for full ranking: every item but the history's is a candidate, scored `chunk`
    item ids at a time; the counts against the truth and a running top-20 add up over the blocks.

    The truth's score comes first (one [B, B] product); should a block score the truth differently (a
    product of another shape may round differently) the blocks are counted again against the block's
    score, so the ranks always follow the scores the blocks gave."""
    score = item_scorer(model, torch.as_tensor(u), histories)
    t = torch.as_tensor(targets)
    rows = torch.arange(len(u))
    n = num_items + 1  # columns: item ids 0 (padding, never a candidate) .. num_items
    c = min(chunk, n)
    # blocks of exactly c columns (the last one overlaps its predecessor, whose columns it skips), so
    # every product has one shape
    starts = [*range(0, n - c, c), n - c]
    h_rows = torch.as_tensor(np.repeat(np.arange(len(u)), [len(h) for h in hist]), dtype=torch.long)
    h_items = torch.as_tensor(np.concatenate([np.asarray(h, dtype=np.int64) for h in hist] or [np.zeros(0, np.int64)]))
    # candidates: every item but the history's, the truth included
    cands = np.array([num_items - len(set(h.tolist()) - {int(x)}) for h, x in zip(hist, targets)], dtype=np.int64)
    whole = score(slice(0, n)).float() if c == n else None  # one block: scored once
    truth = whole[rows, t] if whole is not None else score(t)[rows, rows].float()
    device, k, inf = truth.device, min(TOP, num_items + 2), float("-inf")
    for _ in range(3):
        above = torch.zeros(len(u), dtype=torch.long, device=device)
        tied = torch.zeros_like(above)
        bad = ~torch.isfinite(truth)
        finite_truth = not bool(bad.any())
        seen = truth.clone()
        best = torch.full((len(u), k), inf, device=device)
        best_ids = torch.zeros(len(u), k, dtype=torch.long, device=device)
        done = 0  # columns already counted
        for start in starts:
            s = whole.clone() if whole is not None else score(slice(start, start + c)).float()
            fast = finite_truth and bool(torch.isfinite(s.sum()))  # no NaN or infinite score here
            lo = max(start, done, 1)  # the earlier columns: padding or counted in the previous block
            inside = (h_items >= lo) & (h_items < start + c)
            h_r, h_c = h_rows[inside].to(device), (h_items[inside] - start).to(device)
            here = ((t >= lo) & (t < start + c)).nonzero()[:, 0]
            here, cols = here.to(device), (t[here] - start).to(device)
            seen[here] = s[here, cols]
            if not fast:  # the candidates the truth is ranked against: not the truth itself
                valid = torch.ones_like(s, dtype=torch.bool)
                valid[:, :lo - start] = False
                valid[h_r, h_c] = False
                valid[here, cols] = False
            # what is not a candidate scores -inf: never above the truth nor tied with a finite truth
            s[:, :lo - start] = inf
            s[h_r, h_c] = inf
            s[here, cols] = inf
            if fast:
                above += (s > truth[:, None]).sum(dim=1, dtype=torch.int32)
                tied += (s == truth[:, None]).sum(dim=1, dtype=torch.int32)
            else:
                a, ti, nf = count_against(s, truth, valid)
                above, tied, bad = above + a, tied + ti, bad | nf
            # recommended: the truth too, best first, ties to the smaller id; never a NaN or infinite score
            s[here, cols] = seen[here]
            if not fast:
                s = s.masked_fill(~torch.isfinite(s), inf)
            b, bi = top_k(s, torch.arange(start, start + c, device=device), min(k, c))
            best, best_ids = top_k(torch.cat([best, b], dim=1), torch.cat([best_ids, bi], dim=1), k)
            done = start + c
        if bool(((seen == truth) | (torch.isnan(seen) & torch.isnan(truth))).all()):
            break
        truth = seen
    else:
        raise RuntimeError("the model scores the true items differently on every call: full ranking needs "
                           "deterministic scores")
    top = best_ids.masked_fill(best == inf, 0)
    r, top, bad = (x.cpu().numpy() for x in (rank_of(above, tied, u), top, bad))
    return [r, cands, top, bad]


def evaluate(model: Scorer, ds: SeqDataset, split: str = "test", protocol: str = "100",
             batch_size: int = 256, max_len: int = 200, progress: bool = False,
             users: np.ndarray | None = None, chunk_size: int | None = None, shard: bool = True) -> dict[str, float]:
    """Metrics of a model with the random-ranker floor of the same protocol and users/s (`rank_users`)."""
    t0 = time.perf_counter()
    ranking = rank_users(model, ds, split, protocol, users=users, batch_size=batch_size, max_len=max_len,
                         progress=progress, chunk_size=chunk_size, shard=shard)
    seconds = time.perf_counter() - t0
    return {**metrics_of(ranking), "users_per_s": float(len(ranking.ranks) / seconds) if seconds > 0 else float("inf")}


def metrics_of(ranking: Ranking, rows: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of a ranking's users (or of `rows` of them) beside the random floor of their candidate
    counts, with the count of users whose scores were not finite (no users: a count of 0)."""
    take = slice(None) if rows is None else rows
    r, n, bad = ranking.ranks[take], ranking.candidates[take], ranking.nonfinite[take]
    if not len(r):
        return {"users": 0}
    return {**from_ranks(r, n), **{f"random_{k}": v for k, v in random_floor(n).items()}, "users": int(len(r)),
            "nonfinite_users": int(bad.sum())}
