"""Meshes and the one table that maps logical axis names onto mesh axes.

Every parameter and main activation in lavi_jax carries logical axis names
(``batch``, ``embed``, ``heads``, ...). This file alone knows the mesh axes
``("data", "fsdp", "tensor")``; changing a parallelism strategy means changing
``RULES`` and nothing else.

Rules are matched in order and a mesh axis is used at most once per array, so
for an activation ``(batch, length, embed)`` the ``fsdp`` axis is taken by
``batch`` and ``embed`` stays replicated, while for a weight ``(embed, mlp)``
``embed`` is sharded over ``fsdp``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("vit_embed", "fsdp"),
    ("vit_mlp", "tensor"),
    ("vit_heads", "tensor"),
    ("cond_embed", "fsdp"),
)


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """Builds a ``("data", "fsdp", "tensor")`` mesh; one axis may be -1 (fill).

    ``shape`` is e.g. ``{"data": -1, "fsdp": 1, "tensor": 1}`` (the default:
    pure data parallelism over every device).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = dict({"data": -1, "fsdp": 1, "tensor": 1}, **(shape or {}))
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; expected {MESH_AXES}")
    sizes = [int(shape[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {shape}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# The default mesh for using a checkpoint (``lavi_jax.load``): params split over every device along the axes the
# rules put on ``fsdp`` (``embed``, ``vit_embed``, ``cond_embed``), inference batches over every device too.
LOAD_MESH = {"data": 1, "fsdp": -1, "tensor": 1}


def make_load_mesh(devices=None) -> Mesh:
    """The mesh :func:`lavi_jax.load` restores onto by default: ``LOAD_MESH`` (fsdp over every device)."""
    return make_mesh(LOAD_MESH, devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """Context in which activation constraints inside the model take effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield mesh


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op without a mesh)."""
    return nn.with_logical_constraint(x, names, rules=RULES)


def current_mesh():
    """The mesh of the enclosing :func:`use_mesh` (an ``AbstractMesh`` inside a trace), or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def target_platform() -> str:
    """The platform the program being traced is for: the current mesh's devices' (``"tpu"`` when compiling
    for a TPU topology from a CPU host), else the default backend's."""
    mesh = current_mesh()
    device = None if mesh is None else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def logical_spec(names: tuple[str | None, ...], shape: tuple[int, ...] | None = None) -> PartitionSpec:
    """The ``PartitionSpec`` of logical axis ``names`` on the current mesh; with ``shape``, a dimension whose
    size the mesh axes do not divide is left replicated (for ``shard_map`` specs, which must divide)."""
    spec = list(nn.logical_to_mesh_axes(names, RULES))
    mesh = current_mesh()
    if shape is not None and mesh is not None:
        for i, axes in enumerate(spec):
            if axes is not None and shape[i] % math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)):
                spec[i] = None
    return PartitionSpec(*spec)


# Logical axes whose size is the model's, not the parallelism's (a vocabulary of 32001): where the mesh axes the
# rules give them do not divide a param's dimension, that dimension stays replicated instead of failing.
UNEVEN_REPLICATED = ("vocab",)


def logical_to_sharding(logical_specs: Any, mesh: Mesh, shapes: Any = None, uneven: tuple[str, ...] | None = UNEVEN_REPLICATED) -> Any:
    """Tree of logical ``PartitionSpec`` -> tree of ``NamedSharding`` on ``mesh``. With ``shapes`` (the params'
    arrays or ShapeDtypeStructs), a dimension of a logical axis in ``uneven`` (None: any axis, for default meshes
    sized by the device count rather than the model) that the mesh does not divide is left replicated."""
    if shapes is None:
        return nn.logical_to_mesh_sharding(logical_specs, mesh, RULES)

    def one(shape, spec):
        axes = list(nn.logical_to_mesh_axes(tuple(spec), RULES))
        for i, (name, a) in enumerate(zip(tuple(spec), axes)):
            if (uneven is None or name in uneven) and a is not None and shape.shape[i] % math.prod(
                    mesh.shape[n] for n in ((a,) if isinstance(a, str) else a)):
                axes[i] = None
        return NamedSharding(mesh, PartitionSpec(*axes))

    return jax.tree.map(one, shapes, logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_shardings(abstract_boxed_params: Any, mesh: Mesh) -> Any:
    """Shardings for a (boxed, abstract) param tree from ``jax.eval_shape(model.init, ...)``."""
    return logical_to_sharding(nn.get_partition_spec(abstract_boxed_params), mesh, nn.unbox(abstract_boxed_params))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a batch-leading array: dim 0 over the batch axes, rest replicated."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), RULES)
    return NamedSharding(mesh, spec)


def to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global arrays, dim 0 sharded over the batch axes.

    Every process passes its own rows of every array (the same keys on every
    process); the global batch is their concatenation in process order.
    """
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def init_params(model: nn.Module, rng: jax.Array, *args, mesh: Mesh | None = None, **kwargs):
    """Initialises ``model``'s params directly in their shards.

    Shapes come from ``jax.eval_shape``; the init itself runs under ``jax.jit``
    with ``out_shardings``, so no device ever holds the full model. Returns a
    plain (unboxed) param dict.
    """
    mesh = mesh if mesh is not None else make_mesh()

    def init(r):
        return nn.unbox(model.init(r, *args, **kwargs)["params"])

    abstract = jax.eval_shape(lambda r: model.init(r, *args, **kwargs)["params"], rng)
    shardings = param_shardings(abstract, mesh)
    with use_mesh(mesh):
        return jax.jit(init, out_shardings=shardings)(rng)


def abstract_params(model: nn.Module, *args, **kwargs):
    """``(unboxed ShapeDtypeStruct tree, logical PartitionSpec tree)`` without allocating."""
    boxed = jax.eval_shape(lambda r: model.init(r, *args, **kwargs)["params"], jax.random.key(0))
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def count_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
