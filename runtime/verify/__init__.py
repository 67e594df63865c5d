"""Does a deployed model compute what PyTorch computes? Tensor sweeps over a graph's shapes
(tensors.py), decoder sweeps and greedy tokens (decoding.py), and the checks export runs (exported.py)."""

# here, so that what sizes a check-parity command needs no heavy imports
DECODE_STEPS = 8  # teacher-forced decode steps after each prompt of the decoder sweep
GENERATE_PROMPT = 8  # tokens of the longest random prompt check-parity --generate decodes from
