"""merge_attention: the exact log-sum-exp combine of attention results over disjoint key sets."""
from __future__ import annotations

from typing import Sequence

import torch

from ..inputs import check_layout


def merge_attention(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor], *, layout: str = "bhsd"):
    """Combine partial attention results computed over disjoint key sets into the exact result.

    If ``out_i, lse_i`` is softmax attention of the same queries over key set ``K_i``, then
    attention over the union of the ``K_i`` is::

        lse = log(sum_i exp(lse_i))
        out = sum_i exp(lse_i - lse) * out_i

    outs: each (B, H, S, D) for layout "bhsd" or (B, S, H, D) for "bshd"; lses: each float
    (B, H, S) natural-log normaliser, as ``attnlib.attention(..., return_lse=True)`` returns.
    A row whose lse is -inf (its shard had no visible key) contributes nothing; a row that
    is -inf everywhere comes out as out = 0, lse = -inf, with no NaN in values or gradients
    (its ``out_i`` must be finite, as attnlib returns 0 there). The combine runs in float32
    (float64 when an input is float64) and is differentiable in every ``out_i`` and ``lse_i``.

    Returns (out, lse): out in the layout and dtype of ``outs[0]``, lse float32 (float64 if an
    lse was float64; the combine itself runs in float64 when any input is) of shape (B, H, S);
    both are new tensors, never one of the inputs (a single part is copied).
    """
    layout = check_layout(layout)
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(f"merge_attention needs one lse per output and at least one of each, "
                         f"got {len(outs)} outputs and {len(lses)} lses")
    for name, parts in (("outs", outs), ("lses", lses)):
        for i, t in enumerate(parts):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"merge_attention: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"merge_attention: {name}[{i}] must be floating point, got {t.dtype}")
    shape, lse_shape, device = outs[0].shape, lses[0].shape, outs[0].device
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.device != device or l.device != device:
            raise ValueError(f"merge_attention: part {i} has out on {o.device}, lse on {l.device}; every out and "
                             f"lse must be on the device of outs[0] ({device})")
        if o.shape != shape or l.shape != lse_shape:
            raise ValueError(f"merge_attention: part {i} has out {tuple(o.shape)}, lse {tuple(l.shape)}; "
                             f"part 0 has out {tuple(shape)}, lse {tuple(lse_shape)}")
    want_lse = None
    if len(shape) == 4:
        want_lse = (shape[0], shape[1], shape[2]) if layout == "bhsd" else (shape[0], shape[2], shape[1])
    if want_lse is None or tuple(lse_shape) != want_lse:
        raise ValueError(f"merge_attention ({layout}): out must be 4-D and lse (B, H, S) = "
                         f"{want_lse or '(out dims 0..2)'}, got out {tuple(shape)}, lse {tuple(lse_shape)}")
    lse_dtype = torch.float64 if any(l.dtype == torch.float64 for l in lses) else torch.float32
    if len(outs) == 1:  # copies, so the caller never gets its own tensor back as the result
        return outs[0].clone(), lses[0].to(lse_dtype, copy=True)

    wide = any(t.dtype == torch.float64 for t in outs + lses)
    ct = torch.float64 if wide else torch.float32
    lse = torch.stack([l.to(ct) for l in lses])                        # (N, B, H, S)
    # the max only keeps exp() in range; the result does not depend on it, so no gradient
    m = lse.detach().amax(dim=0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)                                              # 0 where lse_i = -inf
    total = w.sum(dim=0)
    has = total > 0
    total_safe = torch.where(has, total, torch.ones_like(total))
    lse_out = torch.where(has, m + torch.log(total_safe), torch.full_like(total, float("-inf")))
    w = w / total_safe
    if layout == "bshd":
        w = w.transpose(-1, -2)                                         # (N, B, S, H)
    out = sum(wi.unsqueeze(-1) * o.to(ct) for wi, o in zip(w.unbind(0), outs))
    return out.to(outs[0].dtype), lse_out.to(lse_dtype)
