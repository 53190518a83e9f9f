"""Small building blocks shared by the towers: logically-partitioned dense layers, dtypes, activations."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name) -> jnp.dtype:
    return DTYPES[name] if isinstance(name, str) else name


class Dense(nn.Module):
    """Dense layer over one or more input axes whose kernel carries logical axis ``names``.

    The kernel has shape ``[*input_dims, *features]`` (``names`` lists input axes,
    then output axes) and the bias takes the names of the output axes.
    """

    features: int | Sequence[int]
    names: Sequence[str | None]
    axis: int | Sequence[int] = -1
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable | None = None  # default: LeCun normal over the input dims
    preferred_element_type: Any = None  # the matmul's accumulation / output dtype (None: ``dtype``)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        feats = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axes = tuple(a % x.ndim for a in axes)
        n_in = len(axes)
        shape = tuple(x.shape[a] for a in axes) + feats
        init = self.kernel_init or nn.initializers.lecun_normal(in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, len(shape))))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.names)), shape, self.param_dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), ((axes, tuple(range(n_in))), ((), ())),
                                preferred_element_type=self.preferred_element_type)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(self.names[n_in:])),
                              feats, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def dense(features, names, *, axis=-1, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
          kernel_init=None, preferred_element_type=None, name=None) -> Dense:
    return Dense(features, tuple(names), axis, use_bias, dtype, param_dtype, kernel_init, preferred_element_type, name=name)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
}
