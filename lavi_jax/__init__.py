"""lavi_jax: LaVi vision-language models in JAX/Flax."""

from lavi_jax import config as configs
from lavi_jax.models.lavi import LaVi

__all__ = ["LaVi", "configs"]

from lavi_jax.checkpoint import load  # noqa: E402

__all__.append("load")
