"""Cross-entropy over every item, fused with the output product and computed in chunks of positions.

`F.cross_entropy(h @ table.T, targets)` materialises the [positions, items] logits, keeps them for the
backward pass and walks them three more times (log-softmax forward, its backward, the product's
backward): on ml-1m (25k positions x 3.4k items, 350 MB) that is two thirds of a SASRec step on a CPU.
Here each chunk of positions is scored, turned into its gradient (softmax minus the one-hot target)
while it is still in cache, and multiplied back at once; only the gradients of `h` and `table` are
kept. Same loss and gradients as the unfused form up to float rounding.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

CHUNK_FLOATS = 1 << 19  # logits per chunk (2 MB of float32: about one core's L2 cache) ...
MIN_ROWS = 64  # ... but never fewer positions: on a large catalogue each chunk reads the whole table


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, skip_first: bool,
                grad_enabled: bool) -> torch.Tensor:
        need_h, need_table = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        with torch.autocast(h.device.type, enabled=False):  # float32 throughout: the softmax needs it
            hf, tf = h.float(), table.float()
            rows = max(MIN_ROWS, CHUNK_FLOATS // len(tf))
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(hf) if need_h else None
            grad_table = torch.zeros_like(tf) if need_table else None
            for start in range(0, len(hf), rows):
                hc, tc = hf[start:start + rows], targets[start:start + rows]
                logits = hc @ tf.T
                if skip_first:
                    logits[:, 0] = float("-inf")
                lse = torch.logsumexp(logits, dim=1)
                total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
                if need_h or need_table:
                    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                    grad[torch.arange(len(tc), device=h.device), tc] -= 1
                    if need_h:
                        grad_h[start:start + rows] = grad @ tf
                    if need_table:
                        grad_table.addmm_(grad.T, hc)
        n = max(len(hf), 1)
        ctx.save_for_backward(*(g / n if g is not None else None for g in (grad_h, grad_table)))
        ctx.dtypes = h.dtype, table.dtype
        return total / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_table = ctx.saved_tensors
        dh, dt = ctx.dtypes
        return (None if grad_h is None else (grad_h * grad_out).to(dh),
                None if grad_table is None else (grad_table * grad_out).to(dt), None, None, None)


def linear_cross_entropy(h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                         skip_first: bool = False) -> torch.Tensor:
    """Mean cross-entropy of `h @ table.T` [P, N] against `targets` [P]; `skip_first` leaves column 0
    (the padding row of an item table) out of the softmax, so a target 0 is refused."""
    if skip_first and bool((targets == 0).any()):
        raise ValueError("linear_cross_entropy: a target is the padding item 0, which skip_first leaves out")
    # the gradients are computed in the forward pass: only when autograd will ask for them
    return _LinearCrossEntropy.apply(h, table, targets, skip_first, torch.is_grad_enabled())
