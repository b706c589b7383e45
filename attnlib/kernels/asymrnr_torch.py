"""Method asymrnr on torch: matching, reduce and restore by the PyTorch reference, inner attention on
the torch backend. The CPU / fp64 fallback, and the one with a backward pass (gathers and index
copies are differentiable; the matching is a constant of the inputs)."""
from __future__ import annotations

import torch

from ..dispatch import Kernel, register
from ..inputs import AttentionInputs
from ..recompute import vjp as func_vjp


class AsymrnrKernel(Kernel):
    method = "asymrnr"
    supports_causal = False          # bidirectional video attention: reduction breaks causal order
    supports_seq_q_ne_seq_k = False  # one partition of one token grid serves Q and K/V
    lse_is_free = False              # lse takes an inner kernel that returns one (not torch SDPA)
    piece_backend = "torch"

    def extra_reasons(self, inp: AttentionInputs) -> list[str]:
        if inp.requires_grad and self.supports_backward and inp.options.get("inner_method") != "flash":
            return [f"inputs require grad but inner_method {inp.options.get('inner_method')!r} has no backward"]
        return []

    def _run(self, inp: AttentionInputs, *, q=None, k=None, v=None, out=None, return_lse=None, inner=None):
        from ..asymrnr.module import asymrnr_attention

        o = inp.options
        return asymrnr_attention(
            inp.q if q is None else q, inp.k if k is None else k, inp.v if v is None else v,
            grid=o["grid"], stride=o["stride"], q_ratio=o["q_ratio"], kv_ratio=o["kv_ratio"], metric=o["metric"],
            mode=o["mode"], text_tokens=o["text_tokens"], text_side=o["text_side"], seed=o["seed"],
            method=o["inner_method"], scale=inp.scale, backend=self.piece_backend,
            return_lse=inp.return_lse if return_lse is None else return_lse, out=out, inner=inner)

    def forward(self, inp: AttentionInputs):
        out = None if inp.return_lse or inp.requires_grad else inp.new_output()
        return self._run(inp, out=out)


def _flash_reference_inner(q, k, v, *, scale, return_lse):
    from ..reference.flash import flash_reference

    return flash_reference(q, k, v, scale=scale, return_lse=return_lse)


class AsymrnrTorch(AsymrnrKernel):
    name = "asymrnr-torch"
    backend = "torch"
    priority = 0
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def backward(self, inp: AttentionInputs, out: torch.Tensor, lse: torch.Tensor | None, dout: torch.Tensor,
                 dlse: torch.Tensor | None) -> tuple:
        """Recompute under torch.func.vjp with the flash reference as the inner attention: the same
        function the forward's inner torch dispatch ran, without a nested custom op (which
        functorch transforms cannot enter). The matching is a constant of the inputs."""
        with_lse = dlse is not None

        def f(q, k, v):
            res = self._run(inp, q=q, k=k, v=v, return_lse=with_lse, inner=_flash_reference_inner)
            return tuple(res) if with_lse else (res,)

        outs, vjp = func_vjp(f, inp.q, inp.k, inp.v)
        cot = (dout.to(outs[0].dtype), dlse.to(outs[1].dtype)) if with_lse else (dout.to(outs[0].dtype),)
        dq, dk, dv = vjp(cot)
        return dq, dk, dv, None, None


register(AsymrnrTorch())
