"""Benchmarks: prefill and decode timing of any Decoder, next to the GPU's physical floor."""
