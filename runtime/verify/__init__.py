"""Does a deployed model compute what PyTorch computes? Tensor sweeps over a graph's shapes
(tensors.py), decoder sweeps and greedy tokens (decoding.py), and the checks export runs (exported.py)."""

DECODE_STEPS = 8  # teacher-forced decode steps after each prompt of the decoder sweep (here: no heavy imports)
