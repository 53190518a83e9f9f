"""Small building blocks shared by the towers: logically-partitioned dense layers, dtypes, activations."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name) -> jnp.dtype:
    return DTYPES[name] if isinstance(name, str) else name


def dense(
    features: int | Sequence[int],
    names: Sequence[str | None],
    *,
    axis: int | Sequence[int] = -1,
    use_bias: bool = False,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    kernel_init: Callable = nn.initializers.lecun_normal(),
    name: str | None = None,
) -> nn.DenseGeneral:
    """``nn.DenseGeneral`` whose kernel carries logical axis ``names`` (input axes, then output axes).

    The bias takes the names of the output axes.
    """
    n_out = 1 if isinstance(features, int) else len(features)
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, tuple(names)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(names[-n_out:])),
        name=name,
    )


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
}
