"""The fused, chunked cross-entropy against the plain product + F.cross_entropy it replaces."""
import pytest
import torch
import torch.nn.functional as F

import slmrec.fused_ce as fused_ce
from slmrec.fused_ce import linear_cross_entropy


def inputs(positions=37, items=23, dim=8):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(positions, dim, generator=g, requires_grad=True)
    table = torch.randn(items, dim, generator=g).requires_grad_()
    return h, table, torch.randint(1, items, (positions,), generator=g)


def reference(h, table, targets, skip_first):
    logits = h @ table.T
    if skip_first:
        logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets)


@pytest.mark.parametrize("skip_first", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])  # one position per chunk, a ragged last chunk, one chunk
def test_same_loss_and_gradients_as_the_unfused_form(skip_first, chunk_rows, monkeypatch):
    h, table, targets = inputs()
    monkeypatch.setattr(fused_ce, "CHUNK_FLOATS", chunk_rows * len(table))
    monkeypatch.setattr(fused_ce, "MIN_ROWS", 1)
    want = reference(h, table, targets, skip_first)
    want_grads = torch.autograd.grad(want, [h, table])
    got = linear_cross_entropy(h, table, targets, skip_first)
    got_grads = torch.autograd.grad(got * 3.0, [h, table])  # the incoming gradient scales both
    assert torch.allclose(got, want, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, 3.0 * w, atol=1e-6)


def test_padding_column_gets_no_probability_and_is_no_target():
    h, table, targets = inputs()
    grad = torch.autograd.grad(linear_cross_entropy(h, table, targets, skip_first=True), table)[0]
    assert grad[0].abs().max() == 0  # the padding row is never a candidate
    targets[3] = 0
    with pytest.raises(ValueError, match="padding item 0"):
        linear_cross_entropy(h, table, targets, skip_first=True)


def test_without_gradients_and_under_autocast():
    h, table, targets = inputs()
    want = reference(h, table, targets, skip_first=True)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(h, table, targets, skip_first=True), want, atol=1e-6)
    # only the table needs a gradient (a frozen encoder): h's is neither computed nor returned
    frozen = h.detach()
    grad = torch.autograd.grad(linear_cross_entropy(frozen, table, targets, True), table)[0]
    assert torch.allclose(grad, torch.autograd.grad(reference(frozen, table, targets, True), table)[0], atol=1e-6)
    # bf16 inputs under autocast: the softmax stays in float32, each gradient comes back in its input's
    # dtype, and both equal the float32 computation on the bf16-rounded inputs
    low = h.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(low, table, targets, skip_first=True)
    grad_low, grad_table = torch.autograd.grad(loss, [low, table])
    rounded = low.detach().float().requires_grad_()
    want = reference(rounded, table, targets, skip_first=True)
    want_grads = torch.autograd.grad(want, [rounded, table])
    assert loss.dtype == torch.float32 and torch.allclose(loss, want, atol=1e-6)
    assert grad_low.dtype == torch.bfloat16 and grad_table.dtype == torch.float32
    assert torch.allclose(grad_low.float(), want_grads[0], atol=1e-3, rtol=1e-2)
    assert torch.allclose(grad_table, want_grads[1], atol=1e-6)
