"""Fusion of SLIM rationale vectors with ID-based and distilled LLM recommenders, the report and the pipeline.

Stages (each a `Stage` of `eval.stage`, a folder of the run, a table of the presets, a command):
  data          eval.dataset.DataStage   `fusion prepare`   interactions, items, splits, fixed candidates
  fusion/NAME   train.FusionStage        `fusion train`     a fused model (hybrid or text matching)
  report        report.ReportStage       `fusion evaluate`  every model on the same candidates
The whole pipeline (`fusion run`) is the list in `pipeline.py`. Models: model.HybridFusion and
model.TextMatching, the two registered kinds of model.FusedRecommender.
"""
import slmrec  # noqa: F401  (registers the ID and LLM recommenders)

from . import model  # noqa: F401  (registers the fused model kinds)
