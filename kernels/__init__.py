"""Triton kernels for the packed-token encoder (installed as ``fastbert.kernels``): the ``triton`` backend.

One op per file; each exposes the function of ``fastbert.reference`` with the same name and signature. GEMMs
are cuBLAS through torch, with their epilogues (bias + GELU, bias + residual + LayerNorm) as fused Triton
passes. Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

UNAVAILABLE_REASON: str | None = None

try:
    import triton  # noqa: F401
except Exception as exc:  # no triton wheel for this platform, or a broken install
    UNAVAILABLE_REASON = f"triton cannot be imported: {type(exc).__name__}: {exc}"
else:
    from .attention import attention
    from .bias_activation import bias_activation
    from .embeddings import embeddings
    from .layer_norm import add_layernorm, bias_residual_layernorm
    from .linear import linear, linear_residual_layernorm, prepack_linear

    __all__ = [
        "add_layernorm",
        "attention",
        "bias_activation",
        "bias_residual_layernorm",
        "embeddings",
        "linear",
        "linear_residual_layernorm",
        "prepack_linear",
    ]
