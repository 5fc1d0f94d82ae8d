"""The tiny toy transformer the training tests build (seconds on a CPU, not the shipped size)."""

TINY = {
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "axes_dims_rope": (4, 6, 6),
}
