"""Triton kernels for the packed-token encoder (installed as ``fastbert.kernels``): the ``triton`` backend.

One op per file; each exposes the function of ``fastbert.reference`` with the same name and signature. GEMMs
are cuBLAS through torch, with their epilogues (bias + GELU, bias + residual + LayerNorm) as fused Triton
passes. Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).

Every op is differentiable: each file also holds the op's Triton backward kernels and registers forward and
backward as ``torch.library`` custom ops (namespace ``fastbert_triton``) with ``register_fake`` and
``register_autograd``, so eager autograd and torch.compile share one contract. Eager inference (no gradient
needed, not compiling) calls the launchers directly. Double backward is not supported (a clear RuntimeError).
"""

UNAVAILABLE_REASON: str | None = None
#: Every op has registered gradients; ``fastbert.ops.Backend.trains`` reads this.
DIFFERENTIABLE = False

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

    DIFFERENTIABLE = True
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
