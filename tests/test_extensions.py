"""One place for each thing a user adds: a backbone registered from this test module (no project file
edited) is trained by the pipeline from a table of its name, fused with text and found by the report."""
from dataclasses import dataclass

import torch

from eval.dataset import load_dataset
from eval.registry import MODELS, register_model
from fusion.pipeline import build_stages, run_pipeline
from slmrec.seqrec import SequentialRecommender
from tests.test_fusion import vectors, write_vectors


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
    preset.write_text(f"""
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
