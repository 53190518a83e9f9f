"""Hugging Face <-> lavi_jax: checkpoints in and out, with one name mapping for both directions.

    from lavi_jax.hf import import_hf, export_params
    cfg, params = import_hf("/hf/Qwen2-7B-Instruct", "/hf/siglip-so400m-patch14-384", mesh=mesh)
    export_params(cfg, params, "/export/run1")       # llm/, vision/, lavi/

``mapping`` (JAX path <-> HF name + hook), ``config`` (HF ``config.json`` <->
lavi_jax config), ``safetensors_io`` (tensor-by-tensor reading and writing),
``placement`` (converted tensors straight into their shards), ``importer`` and
``exporter`` (the whole directories), ``hub`` (Hugging Face Hub ids, ``org/name[@revision]``, through the
Hub cache). Every directory is read and written through :mod:`lavi_jax.storage`, so it may
be a local path or a URI (``gs://bucket/dir``). The command-line tools are in ``conversions/``.
"""

from lavi_jax.hf.errors import ConversionError, UnsupportedModel
from lavi_jax.hf.exporter import export_hf, export_params, lavi_config
from lavi_jax.hf.importer import copy_tokenizer, full_config, import_hf, model_config_from_hf, plan, tokenizer_source
from lavi_jax.hf.placement import export_tensors, load_params
from lavi_jax.hf.safetensors_io import SafetensorsReader, write_safetensors

__all__ = ["ConversionError", "SafetensorsReader", "UnsupportedModel", "copy_tokenizer", "export_hf", "export_params",
           "export_tensors", "full_config", "import_hf", "lavi_config", "load_params", "model_config_from_hf", "plan",
           "tokenizer_source", "write_safetensors"]
