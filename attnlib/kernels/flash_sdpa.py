"""Method flash on torch's own scaled_dot_product_attention: a torch-backend kernel. On GPUs,
first for fp16/bf16 calls without gradients or with deterministic=False (measured fastest there;
see ``rank``) and the fallback where attnlib's Triton/CUDA kernels are not installed. On the CPU,
the kernel wherever torch's dispatcher picks its CPU flash kernel (fp32/fp16/bf16 inference and
fp32 training, memory-bounded like flash-torch-chunked and faster on the CI CPU: see
``cpu_priority`` and ``cpu_backward_ok``).
A graph-building call that selects it runs it outside attnlib's op (api.attention), so that
torch's autograd runs SDPA's own backward."""
from __future__ import annotations

import warnings

import torch

from ..dispatch import Kernel, register
from ..inputs import AttentionInputs
from ..key_mask import per_head


class FlashSDPA(Kernel):
    name = "flash-torch-sdpa"
    method = "flash"
    backend = "torch"
    priority = 10
    devices = ("cuda", "cpu")
    supports_lse = False  # torch's public SDPA does not return the log-sum-exp

    # Above flash-triton (20) for half-precision calls that need no gradient: on an H100 (2026-11-27,
    # bench/results/nvidia-h100-80gb-hbm3/) torch SDPA's own choice (cuDNN) ran the forward 1.15-1.55x
    # faster than attnlib's Triton kernel at hd64-128. Calls that build a graph keep attnlib's
    # kernels, whose backward is deterministic, unless the caller passed deterministic=False: torch's
    # cuDNN and flash backwards are not deterministic, and on an H200 (2026-11-27,
    # bench/results/nvidia-h200/) SDPA's forward + backward took 0.62-0.72x flash-triton's time.
    # float32 stays below: torch has no fused flash or cuDNN kernel for it and may fall back to a
    # path that forms N x N.
    half_inference_priority = 25

    # below flash-torch-chunked (5) where torch SDPA has no fused kernel for the inputs and would
    # run its math path, which forms the N x N scores (fp32 at a head dim past its kernels', a
    # fused backend switched off with torch.backends.cuda.enable_*_sdp(False))
    math_path_priority = 1

    # CPU tensors where torch picks its CPU flash kernel (tiled, O(N) memory): above
    # flash-torch-chunked (5), which took 2.2-4.4x its time on the CI CPU (1x8x2048x64, fp32 / fp16
    # / bf16, 2026-11-27), and below flash-triton (20), which runs CPU tensors only under
    # TRITON_INTERPRET=1, i.e. in tests of the Triton kernels. Graph-building calls too when fp32
    # (cpu_backward_ok); 16-bit ones keep the chunked kernel by ranking at math_path_priority.
    cpu_priority = 8

    def rank(self, inp: AttentionInputs) -> int:
        if not fused_sdpa_possible(inp):
            return self.math_path_priority
        if not on_gpu(inp):
            return self.math_path_priority if inp.requires_grad and not cpu_backward_ok(inp) else self.cpu_priority
        if inp.dtype not in (torch.float16, torch.bfloat16) or inp.options.get("key_mask") is not None:
            # with a mask torch has no flash kernel (its measured lead was cuDNN / flash without
            # one): flash-triton, which adds the key bias per tile, keeps the lead (not measured)
            return self.priority
        if inp.head_dim % 8 or inp.head_dim > 256 or inp.head_dim_v != inp.head_dim:
            return self.priority  # outside torch's fused kernels: its math path forms N x N
        # inp.requires_grad, not torch.is_grad_enabled(): inside attnlib's op autograd is off, and
        # inp.grad carries whether the caller builds a graph
        if inp.requires_grad and not nondeterministic_ok(inp):
            return self.priority
        return self.half_inference_priority

    def extra_reasons(self, inp: AttentionInputs) -> list[str]:
        r = []
        if inp.causal and inp.seq_q != inp.seq_k:
            r.append("torch SDPA's is_causal is top-left aligned; bottom-right causal with seq_q != seq_k "
                     "needs another kernel")
        mask = inp.options.get("key_mask")
        if inp.causal and mask is not None:
            r.append("torch SDPA takes is_causal or an attn_mask, not both (a causal key mask would be "
                     "seq_q x seq_k)")
        if mask is not None and mask.dtype != torch.bool and mask.dtype != inp.dtype:
            # SDPA takes a float mask only in the inputs' dtype: rounded to fp16 / bf16 a bias loses
            # digits, and -1e5 or 7e4 overflow (0 or NaN rows); the other kernels read it in fp32
            r.append(f"a floating key_mask of dtype {mask.dtype} (torch SDPA would round it to the inputs' "
                     f"{inp.dtype})")
        return r

    def forward(self, inp: AttentionInputs):
        # the builtin, not the torch.nn.functional attribute, which patch_sdpa may have replaced
        return torch._C._nn.scaled_dot_product_attention(
            inp.q, inp.k, inp.v, attn_mask=sdpa_mask(inp), is_causal=inp.causal, scale=inp.scale,
            enable_gqa=inp.is_gqa)


def sdpa_mask(inp: AttentionInputs):
    """The call's key mask (attnlib/key_mask.py) as torch SDPA's attn_mask (B or 1, Hq or 1, 1, Sk); None
    without one. A floating one is served only in the inputs' dtype (extra_reasons); the cast is
    for rank's probe, which runs before those reasons."""
    mask = inp.options.get("key_mask")
    if mask is None:
        return None
    mask = per_head(mask)[:, :, None, :]
    return mask if mask.dtype == torch.bool else mask.to(inp.dtype)


def on_gpu(inp: AttentionInputs) -> bool:
    """Whether the call's tensors are on a GPU (the GPU ranking applies; tests of that ranking
    on a CPU-only machine patch this)."""
    return inp.q.is_cuda


def fused_sdpa_possible(inp: AttentionInputs) -> bool:
    """Whether torch SDPA would run one of its fused kernels (flash, memory-efficient, cuDNN; on
    the CPU its flash kernel) on these inputs, as its own dispatcher decides (dtype, head dim,
    alignment, the enable_*_sdp switches), rather than its math path."""
    return torch_says_fused(inp)


def torch_says_fused(inp: AttentionInputs) -> bool:
    """torch SDPA's own choice for these inputs (torch._fused_sdp_choice, the function SDPA calls),
    else, on CUDA, its public can_use_* checks where that private function is missing or changed
    (True where those are missing too: rank as before). On the CPU without the private function:
    False (no public check there), so CPU calls keep flash-torch-chunked."""
    try:
        from torch.nn.attention import SDPBackend

        if torch.backends.cuda.math_sdp_enabled():
            choice = _fused_sdp_choice(inp)
        else:
            # math switched off (sdpa_kernel(FLASH_ATTENTION), ...): torch warns why each enabled fused
            # kernel cannot take inputs it has no kernel for, which here are a question, not a call
            # (attnlib then runs another kernel)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                choice = _fused_sdp_choice(inp)
        return SDPBackend(choice) not in (SDPBackend.MATH, SDPBackend.ERROR)
    except (AttributeError, ImportError, TypeError, ValueError, RuntimeError):
        pass
    if not on_gpu(inp):
        return False
    cuda = torch.backends.cuda
    try:
        params = cuda.SDPAParams(inp.q, inp.k, inp.v, sdpa_mask(inp), 0.0, inp.causal, inp.is_gqa)
        checks = [cuda.can_use_flash_attention, cuda.can_use_efficient_attention,
                  getattr(cuda, "can_use_cudnn_attention", None)]
        return any(check(params, False) for check in checks if check is not None)
    except (AttributeError, TypeError, RuntimeError):  # another torch's signature: rank as before
        return True


def _fused_sdp_choice(inp: AttentionInputs) -> int:
    return torch._fused_sdp_choice(inp.q, inp.k, inp.v, attn_mask=sdpa_mask(inp), is_causal=inp.causal,
                                   scale=inp.scale, enable_gqa=inp.is_gqa)


def cpu_backward_ok(inp: AttentionInputs) -> bool:
    """Whether torch's CPU flash backward may serve a graph-building call: fp32 only.

    It is deterministic whatever the thread count (one thread walks all of a (batch, head)'s
    blocks in a fixed order: aten/src/ATen/native/cpu/FlashAttentionKernel.cpp; gradients were
    bit-identical at 1, 2 and 3 threads, GQA too, torch 2.13) and at the FLUX.1-1024 shape took
    0.59x flash-torch-chunked's forward + backward time (bench/results/cpu/torch-cpu.md). For
    fp16/bf16 it adds dQ, dK and dV up across blocks in the input dtype: dV's error against the
    float64 reference was 2.7x the chunked kernel's (fp16, causal, 1x4x1000x64), past flash_attn's
    2x-of-torch rule, so those keep flash-torch-chunked (fp32 accumulation)."""
    return inp.dtype in CPU_TRAINING_DTYPES


CPU_TRAINING_DTYPES = (torch.float32,)


def may_serve_graph(q, deterministic, return_lse: bool) -> bool:
    """Cheap pre-check for api.attention: whether a graph-building flash call on q might select
    this kernel (then it runs outside attnlib's op, see api._sdpa_with_its_autograd). Calls that
    ask for lse never do (supports_lse): they skip the second validation and selection, as do
    meta tensors (the op's Meta kernel serves them)."""
    if return_lse is True or not isinstance(q, torch.Tensor) or q.is_meta:
        return False
    if deterministic is False:
        return True
    return not q.is_cuda and q.dtype in CPU_TRAINING_DTYPES


def nondeterministic_ok(inp: AttentionInputs) -> bool:
    """Whether a backward that is not bit-reproducible may run: the caller passed
    deterministic=False and torch.use_deterministic_algorithms is off."""
    return inp.options.get("deterministic", True) is False and not torch.are_deterministic_algorithms_enabled()


register(FlashSDPA())
