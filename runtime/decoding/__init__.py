"""Token-by-token decoding: one Decoder interface, its two implementations, and the sampling loop."""
