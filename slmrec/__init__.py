"""SLMRec: ID-based sequential recommenders and LLM-based ones distilled from deep to shallow.

Stages (each a `Stage` of `eval.stage`, a folder of the run, a table of the presets, a command):
  sasrec          pretrain.BackboneStage        `slmrec pretrain`       ID backbone + item embeddings
  gru4rec, ...    pretrain.BackboneStage        `slmrec pretrain --model gru4rec`  any other registered
                                                backbone, when a preset has a table of its name
  slmrec-teacher  llm_train.TeacherStage        `slmrec train-teacher`  deep LLM recommender (LoRA)
  slmrec-student  llm_train.StudentStage        `slmrec distill`        shallow student, feature-distilled
Models (joined to `eval.registry` on import): SASRec, GRU4Rec (seqrec.SequentialRecommender), LLMRec.
"""
from . import gru4rec, llm, sasrec  # noqa: F401  (registers the models)
