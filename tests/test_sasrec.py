"""The ID backbones (SASRec, GRU4Rec): masks, padding invariance, checkpoints, losses, and that they learn."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import write_atomic

from eval.dataset import prepare_dataset
from eval.errors import InputError
from eval.evaluate import evaluate
from eval.io import read_json
from eval.preprocess import PrepareConfig
from eval.registry import load_model
from eval.stage import run_stage
from slmrec.gru4rec import GRU4Rec, GRU4RecConfig
from slmrec.pretrain import BackboneStage, PretrainConfig
from slmrec.sasrec import SASRec, SASRecConfig
from slmrec.seqrec import load_item_embeddings
from slmrec.trainer import TrainConfig, batches, fit, lr_scheduler, next_item_pairs


def small(num_items=30, **kw):
    torch.manual_seed(0)
    return SASRec(SASRecConfig(num_items=num_items, hidden=16, layers=2, heads=2, max_len=12, **kw)).eval()


def small_gru(num_items=30, **kw):
    torch.manual_seed(0)
    return GRU4Rec(GRU4RecConfig(num_items=num_items, hidden=16, gru_hidden=24, layers=2, max_len=12, **kw)).eval()


def small_original(num_items=30, **kw):
    """SASRec as its original implementation builds it: block, positions and initialisation."""
    return small(num_items, block="sasrec", positions="from-first", init_std=0.02, **kw)


BACKBONES = pytest.mark.parametrize("make", [small, small_original, small_gru],
                                    ids=["sasrec", "sasrec-original", "gru4rec"])


def test_positions_count_from_the_latest_or_the_first_item_never_the_padding():
    real = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]]) > 0
    assert small().position_ids(real)[0, 2:].tolist() == [2, 1, 0]
    assert small_original().position_ids(real).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def original_reference(m: SASRec, histories: list[list[int]]) -> torch.Tensor:
    """The last real position's vector as SASRec+'s implementation computes it (right padding,
    positions 0.. from the first item, nn.MultiheadAttention with the query from the normalised input
    and keys and values from the raw one, residual on the normalised query, then LayerNorm and a
    feed-forward added to its input), from `m`'s weights; dropout off."""
    L, D, heads = max(map(len, histories)), m.config.hidden, m.config.heads
    ids = torch.tensor([h + [0] * (L - len(h)) for h in histories])
    real = (ids > 0)[..., None]
    x = (m.item_emb(ids) * D ** 0.5 + m.pos_emb(torch.arange(L))) * real
    future = ~torch.ones(L, L, dtype=torch.bool).tril()
    for blk in m.blocks:
        mha = torch.nn.MultiheadAttention(D, heads, batch_first=True)
        mha.in_proj_weight.data.copy_(blk.qkv.weight)
        mha.in_proj_bias.data.copy_(blk.qkv.bias)
        mha.out_proj.load_state_dict(blk.proj.state_dict())
        q = blk.ln1(x)
        x = blk.ln2(q + mha(q, x, x, attn_mask=future, need_weights=False)[0])
        x = (x + blk.ffn(x)) * real
    return m.ln(x)[torch.arange(len(histories)), torch.tensor([len(h) - 1 for h in histories])]


def test_original_block_matches_the_sasrec_plus_implementation():
    m = small_original(dropout=0.0)
    histories = [[3, 4, 5], [1, 2, 3, 4, 5, 6], [7]]
    with torch.no_grad():
        want = original_reference(m, histories)
        got = m.encode(torch.tensor([[0] * (6 - len(h)) + h for h in histories]))[:, -1]
    assert torch.allclose(got, want, atol=1e-5)


def test_original_initialisation_and_unknown_settings():
    m = small_original(num_items=2000)
    for w in (m.item_emb.weight[1:], m.pos_emb.weight, m.blocks[0].qkv.weight):
        assert abs(w.std().item() - 0.02) < 0.002
    assert m.blocks[0].qkv.bias.abs().max() == 0 and m.item_emb.weight[0].abs().max() == 0
    with pytest.raises(InputError, match="block: unknown 'post-ln'"):
        small(block="post-ln")
    with pytest.raises(InputError, match="positions: unknown 'absolute'"):
        small(positions="absolute")
    with pytest.raises(InputError, match="init_std: -0.02"):
        small(init_std=-0.02)
    with pytest.raises(InputError, match="qkv_init: unknown 'kaiming'"):
        small(qkv_init="kaiming")


def test_sasrec_plus_keeps_xavier_qkv_and_drops_only_the_attention_weights():
    """SASRec+'s q/k/v are nn.MultiheadAttention's (Xavier-uniform over one [3D, D] matrix, zero bias)
    while every other weight is N(0, init_std); its attention output goes to the residual undropped."""
    m = small_original(num_items=2000, qkv_init="xavier", attn_out_dropout=False, dropout=0.5)
    bound = math.sqrt(6 / (16 + 3 * 16))
    for blk in m.blocks:
        assert blk.qkv.weight.abs().max() <= bound and abs(blk.qkv.weight.std().item() - bound / 3 ** 0.5) < 0.02
        assert blk.qkv.bias.abs().max() == 0 and abs(blk.proj.weight.std().item() - 0.02) < 0.005

    def residual_dropouts(attn_out_dropout: bool) -> int:
        model, calls = small_original(dropout=0.5, attn_out_dropout=attn_out_dropout).train(), []
        for blk in model.blocks:
            blk.drop.register_forward_hook(lambda *_: calls.append(1))
        model.encode(torch.tensor([[0, 3, 4, 5]]))
        return len(calls)
    # per block: on the attention output and the feed-forward's, or on the latter only
    assert (residual_dropouts(True), residual_dropouts(False)) == (4, 2)


@BACKBONES
def test_padding_does_not_change_scores(make):
    m = make()
    h = torch.tensor([[0, 0, 3, 4, 5]])
    more = torch.tensor([[0, 0, 0, 0, 0, 0, 3, 4, 5]])
    users = torch.tensor([0])
    assert torch.allclose(m.score(users, h, None), m.score(users, more, None), atol=1e-5)
    # in a batch with longer and empty histories, each row scores as it does alone
    batch = torch.tensor([[0, 0, 0, 3, 4, 5], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0]])
    alone = torch.cat([m.score(users, torch.tensor([[3, 4, 5]]), None),
                       m.score(users, torch.tensor([[1, 2, 3, 4, 5, 6]]), None)])
    both = m.score(torch.arange(3), batch, None)
    assert torch.allclose(both[:2], alone, atol=1e-5) and torch.isfinite(both).all()


@BACKBONES
def test_causal_mask_hides_the_future(make):
    m = make()
    a = m.encode(torch.tensor([[1, 2, 3, 4]]))
    b = m.encode(torch.tensor([[1, 2, 3, 9]]))
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6) and not torch.allclose(a[:, 3], b[:, 3])


@BACKBONES
def test_padding_item_embedding_is_zero_and_never_recommended(make):
    m = make()
    assert m.item_emb.weight[0].abs().sum() == 0
    loss = m.training_loss(torch.tensor([0]), torch.tensor([[0, 1, 2]]), torch.tensor([[0, 2, 3]]))
    assert torch.isfinite(loss)


@BACKBONES
def test_checkpoint_round_trip_scores_identically(make, tmp_path):
    m = make(dropout=0.1)
    m.save_pretrained(tmp_path / "ck")
    back = load_model(tmp_path / "ck")
    assert type(back) is type(m)
    h = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert torch.equal(m.score(torch.arange(2), h, None), back.score(torch.arange(2), h, None))
    emb = load_item_embeddings(tmp_path / "ck")
    assert emb.shape == (31, 16) and torch.equal(emb, m.item_emb.weight)


def prepared_run(synthetic, run):
    """A run whose data stage has written RUN/data."""
    prepare_dataset(PrepareConfig(source=str(synthetic), rating_gt=None, user_core=1, item_core=1,
                                  negatives=[10]), run)
    return run


@pytest.mark.parametrize("model", ["sasrec", "gru4rec"])
def test_pretrain_learns_and_is_skipped_when_up_to_date(model, synthetic, tmp_path):
    ds = prepare_dataset(PrepareConfig(source=str(synthetic), rating_gt=None, user_core=1, item_core=1,
                                       negatives=[10]), tmp_path)
    cfg = PretrainConfig(model=model, hidden=32, layers=1, heads=1, gru_hidden=32, dropout=0.0,
                         train=TrainConfig(epochs=40, patience=40, batch_size=16, lr=5e-3, max_len=12))
    stage = BackboneStage(tmp_path, cfg)
    out = tmp_path / model
    assert stage.out == out  # the backbone's folder in the run is its model name
    assert run_stage(stage).status == "ran"
    metrics = read_json(out / "metrics.json")
    full = metrics["full ranking"]
    assert full["MRR"] > 3 * full["random_MRR"]
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert run_stage(BackboneStage(tmp_path, cfg)).status == "up to date"
    assert read_json(out / "metrics.json") == metrics
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    reloaded = evaluate(load_model(out), ds, "test", "full", max_len=12)
    assert reloaded["MRR"] == full["MRR"]


def test_unknown_backbone_is_named(synthetic, tmp_path):
    run = prepared_run(synthetic, tmp_path)
    with pytest.raises(InputError, match="model: unknown backbone 'bert4rec'"):
        run_stage(BackboneStage(run, PretrainConfig(model="bert4rec")))
    assert not (run / "bert4rec").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_same_seed_same_model_whatever_ran_before(synthetic, tmp_path):
    run = prepared_run(synthetic, tmp_path)
    cfg = PretrainConfig(hidden=16, layers=1, heads=1, dropout=0.2,
                         train=TrainConfig(epochs=3, batch_size=16, max_len=12))
    runs = []
    for i, out in enumerate(("a", "b")):
        torch.manual_seed(100 + i)  # a different global RNG state, as after other stages in one process
        assert run_stage(BackboneStage(run, cfg, folder=out)).status == "ran"
        runs.append((read_json(run / out / "metrics.json"), SASRec.from_pretrained(run / out)))
    (ma, a), (mb, b) = runs
    assert ma["full ranking"]["MRR"] == mb["full ranking"]["MRR"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_cli_bad_input_is_one_line(tmp_path):
    for args in (["fusion", "prepare", "--run", str(tmp_path), "--source", str(tmp_path / "missing")],
                 ["slmrec", "pretrain", "--run", str(tmp_path / "empty")]):
        mod = "fusion.cli" if args[0] == "fusion" else "slmrec.cli"
        p = subprocess.run([sys.executable, "-c", f"from {mod} import main; main()", *args[1:]],
                           capture_output=True, text=True)
        assert p.returncode == 1
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert str(tmp_path) in p.stderr


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a loaded machine lose a lot to it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ring_fit(tmp_path, loss, seed=0, epochs=20, **train):
    """A small SASRec trained with `loss` on users who each walk a ring of 20 items one step at a time
    (the next item is a function of the last one): its log, test metrics under full ranking, weights."""
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{(start + t) % 20}", 5, t)
            for u, start in enumerate(rng.integers(0, 20, 40)) for t in range(12)]
    ds = prepare_dataset(PrepareConfig(source=str(write_atomic(tmp_path / "ring", "ring", rows)), rating_gt=None,
                                       user_core=1, item_core=1, negatives=[10]), tmp_path / f"run-{seed}")
    torch.manual_seed(seed)
    model = SASRec(SASRecConfig(num_items=ds.num_items, hidden=32, layers=1, heads=1, max_len=12, dropout=0.0))
    cfg = TrainConfig(epochs=epochs, patience=epochs, batch_size=8, lr=1e-2, max_len=12, seed=seed, loss=loss,
                      negatives=8, length_pools=2, eval_every=5, **train)
    log = fit(model, ds, cfg)
    return log, evaluate(model, ds, "test", "full", max_len=12), model.state_dict()


@pytest.mark.parametrize("loss", ["sampled", "gbce"])
def test_sampled_losses_learn_a_deterministic_pattern(loss, tmp_path, one_thread):
    log, test, _ = ring_fit(tmp_path, loss)
    assert [e["epoch"] for e in log["epochs"]] == [0, 5, 10, 15, 20]  # validated every 5 epochs
    assert all(math.isfinite(e["loss"]) for e in log["epochs"][1:])
    assert test["HR@1"] > 0.9


def test_time_budget_stops_at_the_next_validation(tmp_path, one_thread):
    log, _, _ = ring_fit(tmp_path, "sampled", epochs=20, time_budget_s=1e-9)
    assert [e["epoch"] for e in log["epochs"]] == [0, 5]


@pytest.mark.parametrize("loss", ["sampled", "gbce"])
def test_sampled_losses_are_seeded(loss, tmp_path, one_thread):
    runs = [ring_fit(tmp_path / str(i), loss, seed, epochs=3) for i, seed in enumerate((1, 1, 2))]
    (la, _, a), (lb, _, b), (lc, _, c) = runs
    assert [e["loss"] for e in la["epochs"][1:]] == [e["loss"] for e in lb["epochs"][1:]]
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("loss", ["sampled", "gbce"])
def test_sampled_loss_steps_rank_the_target_first(loss, one_thread):
    m = small(dropout=0.0).train()
    inputs, targets = torch.tensor([[0, 1, 2, 3]]), torch.tensor([[0, 2, 3, 4]])
    opt = torch.optim.Adam(m.parameters(), lr=0.02)
    torch.manual_seed(0)
    for _ in range(40):
        m.training_loss(None, inputs, targets, loss=loss, negatives=8).backward()
        opt.step()
        opt.zero_grad()
    assert m.score(torch.tensor([0]), inputs, None)[0, 1:].argmax() + 1 == 4


def test_loss_ignores_padding_and_names_an_unknown_loss():
    m = small()
    short = m.training_loss(None, torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))
    padded = m.training_loss(None, torch.tensor([[0, 0, 1, 2, 3]]), torch.tensor([[0, 0, 2, 3, 4]]))
    assert torch.allclose(short, padded, atol=1e-6)
    with pytest.raises(InputError, match="loss: unknown 'bpr'"):
        m.training_loss(None, torch.tensor([[1, 2]]), torch.tensor([[2, 3]]), loss="bpr")


def test_length_pools_batch_every_example_once_with_similar_lengths():
    lengths = torch.randint(1, 200, (1000,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(batch_size=50, length_pools=4)
    out = batches(lengths, cfg, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(out).tolist()) == list(range(1000))
    padded = sum(int(lengths[b].max()) * len(b) for b in out)
    plain = sum(int(lengths[b].max()) * len(b) for b in batches(lengths, TrainConfig(batch_size=50),
                                                               torch.Generator().manual_seed(0)))
    assert padded < 0.7 * plain


def test_all_windows_train_every_next_item_pair_once_and_latest_keeps_the_most_recent(tmp_path):
    rows = [(f"u{u}", f"i{(7 * u + t) % 30}", 5, t) for u, n in enumerate([3, 6, 11, 14]) for t in range(n)]
    ds = prepare_dataset(PrepareConfig(source=str(write_atomic(tmp_path / "src", "lengths", rows)), rating_gt=None,
                                       user_core=1, item_core=1, negatives=[5]), tmp_path / "run")
    sequences = [s.tolist() for s in ds.train_sequences()]  # 1, 4, 9 and 12 items: the last two held out
    users, inputs, targets = next_item_pairs(ds, 4)
    assert users.tolist() == [1, 2, 3]  # a history of one item has no pair
    for u, x, y in zip(users, inputs, targets):
        assert x[x > 0].tolist() == sequences[u][:-1][-4:] and y[y > 0].tolist() == sequences[u][1:][-4:]
    users, inputs, targets = next_item_pairs(ds, 4, "all")
    assert users.tolist() == [1, 2, 2, 3, 3, 3]  # one row per 4 targets, latest first
    pairs = {u: [] for u in range(ds.num_users)}
    for u, x, y in zip(users, inputs, targets):
        assert ((x > 0) == (y > 0)).all() and (x[1:][y[:-1] > 0] == y[:-1][y[:-1] > 0]).all()  # shifted by one
        pairs[u] += list(zip(x[y > 0].tolist(), y[y > 0].tolist()))
    for u, s in enumerate(sequences):
        assert sorted(pairs[u]) == sorted(zip(s[:-1], s[1:]))  # every pair of the history, once
    assert next_item_pairs(ds, 20, "all")[2].equal(next_item_pairs(ds, 20)[2])  # short histories: the same rows
    with pytest.raises(InputError, match="train.windows: unknown 'every'"):
        next_item_pairs(ds, 4, "every")
    with pytest.raises(InputError, match="train.windows: 'all' is for ID backbones; Linear trains on"):
        fit(torch.nn.Linear(2, 2), ds, TrainConfig(windows="all"))  # a rationale fits only the latest window


def test_cosine_schedule_anneals_the_rate_to_zero_over_the_epochs_and_names_an_unknown_one(tmp_path, one_thread):
    opt = torch.optim.AdamW(small().parameters(), lr=0.01)
    assert lr_scheduler(opt, TrainConfig(epochs=4), steps_per_epoch=5) is None  # constant: no schedule
    schedule = lr_scheduler(opt, TrainConfig(epochs=4, lr_schedule="cosine"), steps_per_epoch=5)
    rates = []
    for _ in range(20):
        opt.step()
        schedule.step()
        rates.append(opt.param_groups[0]["lr"])
    assert rates[9] == pytest.approx(0.005) and rates[-1] == pytest.approx(0.0, abs=1e-12)  # half-way, the end
    assert all(a > b for a, b in zip(rates, rates[1:]))
    with pytest.raises(InputError, match="train.lr_schedule: unknown 'step'"):
        lr_scheduler(opt, TrainConfig(lr_schedule="step"), steps_per_epoch=5)
    # the training loop steps it and still learns the pattern
    log, test, _ = ring_fit(tmp_path, "sampled", lr_schedule="cosine")
    assert test["HR@1"] > 0.9 and all(math.isfinite(e["loss"]) for e in log["epochs"][1:])
