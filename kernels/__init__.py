"""Triton kernels for the packed-token encoder (installed as ``fastbert.kernels``)."""

UNAVAILABLE_REASON = "the Triton kernels are not written yet"
