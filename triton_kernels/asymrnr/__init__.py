"""AsymRnR in Triton: fused matching (distance + argmax over streamed destination tiles) and the
row gathers / merges of reduce and restore. Reference: attnlib/reference/asymrnr.py."""
