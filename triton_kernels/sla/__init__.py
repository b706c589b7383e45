"""SLA (sparse-linear attention, arXiv 2509.24006) in Triton: block classification, the key-block
preprocess, the fused forward and the backward."""
