"""The cpp backend: torch.ops.fastbert.* from the C++ extension fastbert._C."""

UNAVAILABLE_REASON = "the C++ extension is not written yet"
