"""quantpipe: one recipe sends a causal LM through quantization, evaluation, benchmarking and a comparison matrix."""

__version__ = "0.1.0"
