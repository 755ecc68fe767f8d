"""train.seed reaches every initialisation: for each kind of trained model, the weights its trainer
starts from are the same for the same seed and differ for another, whatever ran before."""
import pydoc
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from eval.config import from_dict
from eval.dataset import load_dataset, prepare_dataset
from eval.errors import InputError
from eval.preprocess import PrepareConfig
from fusion.model import HybridConfig, TextMatchingConfig
from fusion.train import FusionStage
from slmrec.distill import DistillConfig
from slmrec.llm import LLMRec, LLMRecConfig
from slmrec.llm_train import LLMTrainConfig, SLMRecStudentConfig, SLMRecTeacherConfig, StudentStage, TeacherStage
from slmrec.pretrain import BackboneStage, PretrainConfig
from slmrec.trainer import TrainConfig
from tests.test_distill import ITEMS, TINY
from slim.finetune import SlimStudentConfig, SlimStudentStage
from tests.test_fusion import vectors, write_vectors
from tests.test_slim_finetune import tiny  # noqa: F401  (a fixture: a tiny LLaMA and teacher records)


class Started(Exception):
    """Raised in place of training, once the starting weights are recorded."""


def starting_weights(target: str, stage, builds: bool = False) -> dict[str, torch.Tensor]:
    """Build `stage` with the function `target` ("module.name") replaced by one that records the trainable
    weights of the model it is handed (its first argument; `builds`: the model it returns) and stops."""
    seen = {}
    real = pydoc.locate(target)

    def record(*args, **kwargs):
        model = real(*args, **kwargs) if builds else args[0]
        seen.update({k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad})
        raise Started

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Started):
        patch.setattr(target, record)
        torch.manual_seed(1234)  # whatever ran before in the process must not matter
        stage.build(stage.run / "out")
    return seen


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def run(synthetic, tmp_path):
    """RUN/data and a hand-made RUN/sasrec holding only its item table (what SLMRec reads)."""
    run = tmp_path / "run"
    prepare_dataset(PrepareConfig(source=str(synthetic), rating_gt=None, user_core=1, item_core=1, negatives=[10]), run)
    (run / "sasrec").mkdir()
    save_file({"item_embeddings": ITEMS}, run / "sasrec" / "item_embeddings.safetensors")
    return run


def teacher(seed: int) -> SLMRecTeacherConfig:
    return SLMRecTeacherConfig(model=LLMRecConfig(llama=TINY, layers=2, lora_r=4), train=LLMTrainConfig(seed=seed))


def student(seed: int) -> SLMRecStudentConfig:
    return SLMRecStudentConfig(student=LLMRecConfig(layers=1, lora_r=4), distill=DistillConfig(blocks=1),
                               train=LLMTrainConfig(seed=seed))


KINDS = {  # kind: (training function the stage calls, stage for a seed)
    "sasrec": ("slmrec.pretrain.fit", lambda run, s: BackboneStage(run, PretrainConfig(train=TrainConfig(seed=s)))),
    "gru4rec": ("slmrec.pretrain.fit", lambda run, s: BackboneStage(run, PretrainConfig(
        model="gru4rec", train=TrainConfig(seed=s)))),
    "slmrec-teacher": ("slmrec.llm_train.train_llm", lambda run, s: TeacherStage(run, teacher(s))),
    "slmrec-student": ("slmrec.llm_train.train_llm", lambda run, s: StudentStage(run, student(s))),
    "fusion hybrid": ("fusion.train.fit", lambda run, s: FusionStage(run, HybridConfig(
        train=TrainConfig(seed=s)), folder="fusion/h")),
    "fusion text": ("fusion.train.fit", lambda run, s: FusionStage(run, TextMatchingConfig(
        hidden=8, train=TrainConfig(seed=s)), folder="fusion/t")),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_training_seed_sets_the_initial_weights(run, kind):
    target, stage = KINDS[kind]
    if kind == "slmrec-student":  # distilled from a saved teacher
        torch.manual_seed(0)
        LLMRec(replace(teacher(0).model, seed=0), ITEMS).save_pretrained(run / TeacherStage.name)
    if kind.startswith("fusion"):  # a backbone and text vectors to fuse
        ds = load_dataset(run / "data")
        BackboneStage(run, PretrainConfig(hidden=8, train=TrainConfig(epochs=1))).build(run / "sasrec")
        write_vectors(run, vectors(ds, users=range(ds.num_users), items=range(1, ds.num_items + 1)))
    first, again, other = (starting_weights(target, stage(run, s)) for s in (1, 1, 2))
    assert first and same(first, again)
    assert not same(first, other)


def test_the_slim_students_seed_sets_its_lora_weights(tiny):  # noqa: F811
    def stage(seed: int) -> SlimStudentStage:
        return SlimStudentStage(tiny["root"], SlimStudentConfig(base_model=str(tiny["model"]), seed=seed))

    first, again, other = (starting_weights("peft.get_peft_model", stage(s), builds=True) for s in (1, 1, 2))
    assert first and same(first, again)
    assert not same(first, other)


@pytest.mark.parametrize("table,cls", [("model", SLMRecTeacherConfig), ("student", SLMRecStudentConfig)])
def test_a_second_seed_in_the_model_table_is_refused(table, cls):
    with pytest.raises(InputError, match=rf"{table}.seed: .*train.seed"):
        from_dict(cls, {table: {"seed": 3}, "train": {"seed": 4}}, "slmrec")
