"""The two errors a conversion raises; each names the offending model type, file, tensor or shapes."""


class ConversionError(ValueError):
    """A checkpoint's tensors do not fit the mapping (missing, unknown, wrong shape, unreadable)."""


class UnsupportedModel(ValueError):
    """A Hugging Face config describes something lavi_jax cannot represent exactly."""
