"""Triton linear attention (Katharopoulos et al., arXiv 2006.16236): non-causal two-pass and causal chunked."""
