"""Triton SageAttention kernels: fused INT8/fp8 quantization (quant.py) and INT8 QK^T attention
with fp16 or fp8 PV (attention.py); forward.py orchestrates them."""
