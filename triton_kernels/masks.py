"""Mask helpers shared by the Triton kernels."""
import triton
import triton.language as tl


@triton.jit
def gated(block_ok, cond):
    """block_ok where the scalar cond holds, else all False: `block_ok & cond` for a load or
    store mask. Triton 3.9's interpreter gives `block & runtime scalar` int32 data, which its
    tl.load / tl.store then refuse as a mask ("mask has unsupported dtype"); a select keeps the
    mask boolean there. Compiled kernels take either form (the sm_90 compile checks hold on 3.6)."""
    return tl.where(cond, block_ok, False)
