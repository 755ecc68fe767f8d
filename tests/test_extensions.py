"""One place for each thing a user adds: a backbone registered from this test module (no project file
edited) is trained by the pipeline from a table of its name, fused with text and found by the report;
a kind of fused model registered here is trained from a [fusion.NAME] table with its mode and reported."""
import json
from dataclasses import dataclass

import pytest
import torch

from eval.dataset import load_dataset
from eval.errors import InputError
from eval.registry import MODELS, load_model, register_model
from fusion.model import FusedConfig, FusedRecommender
from fusion.pipeline import build_stages, run_pipeline
from slmrec.seqrec import SequentialRecommender
from tests.test_fusion import vectors, write_vectors


DATA_AND_SASREC = """
[data]
source = "{synthetic}"
user_core = 1
item_core = 1
negatives = [10]
[sasrec]
hidden = 16
[sasrec.train]
epochs = 1
max_len = 10
"""  # the tiny run each test adds to: the synthetic data and a SASRec (the report's baseline)


@dataclass
class MeanConfig:
    num_items: int
    hidden: int = 16
    max_len: int = 10


@register_model
class RecentMean(SequentialRecommender):
    """A toy backbone: the user after each position is the mean of the items so far, mixed by one layer."""

    model_type = "recent-mean"
    config_class = MeanConfig

    def __init__(self, cfg: MeanConfig):
        super().__init__(cfg)
        self.mix = torch.nn.Linear(cfg.hidden, cfg.hidden)
        self._init_item_table()

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        h = histories[:, -self.config.max_len:]
        x = self.item_emb(h)
        seen = (h > 0).float().cumsum(1).clamp(min=1)[..., None]
        return self.mix(x.cumsum(1) / seen)


def test_a_backbone_added_from_a_test_module_is_trained_fused_and_reported(synthetic, tmp_path):
    preset = tmp_path / "toy.toml"
    preset.write_text(DATA_AND_SASREC.format(synthetic=synthetic) + """
[recent-mean]
hidden = 16
[recent-mean.train]
epochs = 2
max_len = 10
[fusion.on-mean]
backbone = "recent-mean"
[fusion.on-mean.train]
epochs = 1
""")
    run = tmp_path / "run"
    try:
        stages = {s.folder: s for s in build_stages(run, str(preset))}
        assert stages["recent-mean"].config.hidden == 16
        wanted = ["data", "sasrec", "recent-mean"]
        run_pipeline(run, [stages[f] for f in wanted])
        ds = load_dataset(run / "data")
        write_vectors(run, vectors(ds, users=range(ds.num_users), items=range(1, ds.num_items + 1)))
        run_pipeline(run, [stages["fusion/on-mean"], stages["report"]])
    finally:
        del MODELS["recent-mean"]
    assert (run / "recent-mean" / "item_embeddings.safetensors").exists()
    report = (run / "report" / "report.md").read_text()
    assert "| recent-mean |" in report and "| fusion/on-mean vs recent-mean | overall |" in report


@dataclass(frozen=True)
class MeanTextConfig(FusedConfig):
    mode: str = "mean-text"
    hidden: int = 8
    history_weight: float = 1.0


class MeanText(FusedRecommender):
    """A toy fused model: a user is their rationale plus the mean item text of their history, an item its
    text, both through one shared layer (registered by its test, so no other test sees it)."""

    kind = "mean-text"
    config_class = MeanTextConfig

    def add_heads(self, item_pop):
        self.g = torch.nn.Linear(self.shape.text_dim, self.config.hidden)

    def user_vectors(self, users: torch.Tensor, histories: torch.Tensor) -> torch.Tensor:
        seen = (histories > 0).float()[..., None]
        mean = (self._item_text()[histories] * seen).sum(1) / seen.sum(1).clamp(min=1)
        return self.g(self._user_text(users) + self.config.history_weight * mean)

    def item_vectors(self) -> torch.Tensor:
        return self.g(self._item_text())


def test_a_fused_model_kind_added_from_a_test_module_is_trained_and_reported(synthetic, tmp_path):
    preset = tmp_path / "toy.toml"
    preset.write_text(DATA_AND_SASREC.format(synthetic=synthetic) + """
[fusion.toy]
mode = "mean-text"
history_weight = 0.5
[fusion.toy.train]
epochs = 2
max_len = 10
""")
    run = tmp_path / "run"
    register_model(MeanText)
    try:
        stages = {s.folder: s for s in build_stages(run, str(preset))}
        assert isinstance(stages["fusion/toy"].config, MeanTextConfig)
        assert stages["fusion/toy"].config.history_weight == 0.5 and stages["fusion/toy"].config.train.epochs == 2
        with pytest.raises(InputError, match="fusion.toy: unknown setting 'pop_gate'"):   # its settings only
            build_stages(run, str(preset), ["fusion.toy.pop_gate=true"])
        run_pipeline(run, [stages["data"], stages["sasrec"]])
        ds = load_dataset(run / "data")
        write_vectors(run, vectors(ds, users=range(ds.num_users), items=range(1, ds.num_items + 1)))
        run_pipeline(run, [stages["fusion/toy"], stages["report"]])
        model = load_model(run / "fusion" / "toy")
    finally:
        del MODELS[MeanText.model_type]
    assert type(model) is MeanText and model.config.history_weight == 0.5
    assert json.loads((run / "fusion" / "toy" / "config.json").read_text())["model_type"] == "fusion-mean-text"
    assert "full ranking" in json.loads((run / "fusion" / "toy" / "metrics.json").read_text())
    report = (run / "report" / "report.md").read_text()
    assert "| fusion/toy |" in report and "| fusion/toy vs sasrec | overall |" in report
