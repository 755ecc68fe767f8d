"""The LLM recommender: padding invariance, the cached prompt prefix, checkpoints, layer selection."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from eval.errors import InputError
from slmrec.llm import LLMRec, LLMRecConfig, layer_ids

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def tiny(layers=4, num_items=30, dim=8, **kw) -> LLMRec:
    items = torch.randn(num_items + 1, dim, generator=torch.Generator().manual_seed(1))
    return LLMRec(LLMRecConfig(llama=TINY, layers=layers, lora_r=4, **kw), items).eval()


def test_padding_does_not_change_a_users_score():
    m = tiny()
    h = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    more = torch.cat([torch.zeros(2, 4, dtype=torch.long), h], dim=1)
    alone = m.score(None, torch.tensor([[3, 4, 5]]), None)
    assert torch.allclose(m.score(None, h, None), m.score(None, more, None), atol=1e-5)
    assert torch.allclose(m.score(None, h, None)[:1], alone, atol=1e-5)


def test_cached_prompt_prefix_matches_the_full_sequence():
    m = tiny()
    h = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    for a, b in zip(m.hidden_states(h), m.hidden_states(h, prefix_cache=False)):
        assert torch.allclose(a, b, atol=1e-5)


def test_only_adapters_projections_and_heads_train():
    m = tiny(aux_heads=[2])
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or n.split(".")[0] in ("in_proj", "out_proj", "aux") for n in names)
    assert any("gate_proj.lora_A" in n for n in names) and not any("q_proj" in n for n in names)


def test_layer_selection_first_k_and_every_nth():
    assert layer_ids(30, 8, 1) == list(range(8))
    assert layer_ids(32, 8, 4) == [0, 4, 8, 12, 16, 20, 24, 28]
    with pytest.raises(InputError, match="cannot keep"):
        layer_ids(8, 5, 2)
    m = tiny(layers=2, layer_stride=3)
    assert m.num_layers == 2 and len(m.hidden_states(torch.tensor([[1, 2]]))) == 3


def test_saved_and_reloaded_checkpoint_scores_identically(tmp_path):
    m = tiny(aux_heads=[2])
    with torch.no_grad():  # make the adapters non-trivial (LoRA B starts at zero)
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "ck")
    back = LLMRec.from_pretrained(tmp_path / "ck")
    h = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert torch.equal(m.score(None, h, None), back.score(None, h, None))
    assert torch.equal(back.item_vectors(), m.item_vectors()) and back.user_vectors(None, h).shape == (2, 8)


def test_checkpoint_of_the_wrong_shape_is_one_clear_line(tmp_path):
    tiny().save_pretrained(tmp_path / "ck")
    state = load_file(tmp_path / "ck" / "model.safetensors")
    state["out_proj.weight"] = torch.zeros(8, 48)
    save_file(state, tmp_path / "ck" / "model.safetensors")
    with pytest.raises(InputError, match=r"out_proj.weight' has shape \[8, 48\], expected \[8, 32\]") as e:
        LLMRec.from_pretrained(tmp_path / "ck")
    assert "\n" not in str(e.value) and "model.safetensors" in str(e.value)
    with pytest.raises(InputError, match=r"missing: not found \(expected a model folder\)"):
        LLMRec.from_pretrained(tmp_path / "missing")


def test_item_table_of_the_wrong_shape_is_rejected():
    with pytest.raises(InputError, match="item embeddings have shape"):
        LLMRec(LLMRecConfig(llama=TINY, layers=2, num_items=30, item_dim=8), torch.randn(20, 8))
