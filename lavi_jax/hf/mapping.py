"""The declarative JAX <-> Hugging Face name mapping, used for import and export alike.

Each :class:`Rule` pairs a JAX param path (``/``-joined, ``{i}`` = layer index)
with an HF tensor name and a :class:`Hook` that converts the tensor both ways.
:func:`expand` turns the rules for a model config into concrete
:class:`Entry` rows, resolving the layer layout: unrolled layers
(``layers_{i}``) or scanned blocks (``blocks/layers_{j}`` stacked along a
leading ``layers`` axis at index ``i // k``).

Three tensor families are mapped:

* the LLM (HF ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` names),
* the vision tower (HF ``SiglipVisionModel`` / ``CLIPVisionModel`` names,
  relative to the vision transformer),
* the LaVi-only tensors (projector, conditioners, an anyres concat model's
  ``image_newline``) in the ``lavi/`` export
  format read by ``conversions.torch_lavi``: ``projector.*`` and, for a
  modulated HF norm at ``model.layers.{i}.input_layernorm``, its conditioner at
  ``model.layers.{i}.input_layernorm.conditioner.*`` (``model.norm.conditioner.*``
  for the final norm, ``shared_conditioner.*`` when one conditioner is shared),
  and with ``conditioner.kv_share`` the shared visual key / value projections
  of group g at ``conditioner_kv.{g}.k_proj`` / ``.v_proj`` (a shared
  conditioner's stay ``shared_conditioner.k_proj`` / ``.v_proj``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable

import numpy as np

from lavi_jax.models.conditioner import kv_share_groups
from lavi_jax.models.decoder import modulated_layers, scan_block_size


@dataclasses.dataclass(frozen=True)
class Hook:
    """Tensor layout change: ``to_jax(hf_tensor, jax_shape)``, ``to_hf(jax_tensor)`` and ``hf_shape(jax_shape)``.

    ``kind`` tells the reader how to convert a large tensor in row chunks:
    ``"reshape"`` (``to_jax`` is a reshape), ``"transpose"`` (a 2-D transpose,
    then a reshape) or ``"other"`` (whole tensor at once).
    """

    name: str
    to_jax: Callable[[np.ndarray, tuple], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple], tuple]
    kind: str = "other"


def linear(n_in: int) -> Hook:
    """HF ``nn.Linear`` weight [out, in] <-> JAX kernel [*in_dims, *out_dims] (``n_in`` input dims)."""
    return Hook(
        f"linear{n_in}",
        lambda x, shape: np.ascontiguousarray(x.T).reshape(shape),
        lambda x: np.ascontiguousarray(x.reshape(int(np.prod(x.shape[:n_in])), -1).T),
        lambda s: (math.prod(s[n_in:]), math.prod(s[:n_in])),
        "transpose",
    )


COPY = Hook("copy", lambda x, shape: x.reshape(shape), lambda x: x, tuple, "reshape")
FLAT = Hook("flat", lambda x, shape: x.reshape(shape), lambda x: x.reshape(-1), lambda s: (math.prod(s),), "reshape")
CONV = Hook(  # HF Conv2d [out, in, kh, kw] <-> flax Conv [kh, kw, in, out]
    "conv",
    lambda x, shape: np.ascontiguousarray(x.transpose(2, 3, 1, 0)).reshape(shape),
    lambda x: np.ascontiguousarray(x.transpose(3, 2, 0, 1)),
    lambda s: (s[3], s[2], s[0], s[1]),
)
LINEAR, LINEAR2 = linear(1), linear(2)


@dataclasses.dataclass(frozen=True)
class Rule:
    jax: str
    hf: str
    hook: Hook


@dataclasses.dataclass(frozen=True)
class Entry:
    jax: tuple[str, ...]
    layer: int | None  # index along the stacked ``layers`` axis (scanned layout), else None
    hf: str
    hook: Hook


# ----------------------------------------------------------------------------- rules per architecture


def llm_rules(cfg) -> list[Rule]:
    """Qwen2 / LLaMA decoder under ``model.`` + ``lm_head``."""
    layer = "layers_{i}"
    hf = "model.layers.{i}"
    rules = [
        Rule("embed_tokens/embedding", "model.embed_tokens.weight", COPY),
        Rule(f"{layer}/input_layernorm/scale", f"{hf}.input_layernorm.weight", COPY),
        Rule(f"{layer}/post_attention_layernorm/scale", f"{hf}.post_attention_layernorm.weight", COPY),
        Rule(f"{layer}/self_attn/o_proj/kernel", f"{hf}.self_attn.o_proj.weight", LINEAR2),
        Rule(f"{layer}/mlp/gate_proj/kernel", f"{hf}.mlp.gate_proj.weight", LINEAR),
        Rule(f"{layer}/mlp/up_proj/kernel", f"{hf}.mlp.up_proj.weight", LINEAR),
        Rule(f"{layer}/mlp/down_proj/kernel", f"{hf}.mlp.down_proj.weight", LINEAR),
        Rule("norm/scale", "model.norm.weight", COPY),
    ]
    for p in ("q_proj", "k_proj", "v_proj"):
        rules.append(Rule(f"{layer}/self_attn/{p}/kernel", f"{hf}.self_attn.{p}.weight", LINEAR))
        if cfg.attention_bias:
            rules.append(Rule(f"{layer}/self_attn/{p}/bias", f"{hf}.self_attn.{p}.bias", FLAT))
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head/kernel", "lm_head.weight", LINEAR))
    return rules


def vision_rules(cfg) -> list[Rule]:
    """SigLIP / CLIP vision transformer (names relative to the vision model; see ``VISION_PREFIXES``)."""
    layer, hf = "layers_{i}", "encoder.layers.{i}"
    rules = [
        Rule("patch_embedding/kernel", "embeddings.patch_embedding.weight", CONV),
        Rule("position_embedding", "embeddings.position_embedding.weight", COPY),
        Rule("post_layernorm/scale", "post_layernorm.weight", COPY),
        Rule("post_layernorm/bias", "post_layernorm.bias", COPY),
    ]
    if cfg.type == "siglip":
        rules.append(Rule("patch_embedding/bias", "embeddings.patch_embedding.bias", COPY))
    else:
        rules += [
            Rule("class_embedding", "embeddings.class_embedding", COPY),
            Rule("pre_layrnorm/scale", "pre_layrnorm.weight", COPY),
            Rule("pre_layrnorm/bias", "pre_layrnorm.bias", COPY),
        ]
    for ln in ("layer_norm1", "layer_norm2"):
        rules += [Rule(f"{layer}/{ln}/scale", f"{hf}.{ln}.weight", COPY), Rule(f"{layer}/{ln}/bias", f"{hf}.{ln}.bias", COPY)]
    for p in ("q_proj", "k_proj", "v_proj"):
        rules += [Rule(f"{layer}/{p}/kernel", f"{hf}.self_attn.{p}.weight", LINEAR),
                  Rule(f"{layer}/{p}/bias", f"{hf}.self_attn.{p}.bias", FLAT)]
    rules += [
        Rule(f"{layer}/out_proj/kernel", f"{hf}.self_attn.out_proj.weight", LINEAR2),
        Rule(f"{layer}/out_proj/bias", f"{hf}.self_attn.out_proj.bias", COPY),
        Rule(f"{layer}/fc1/kernel", f"{hf}.mlp.fc1.weight", LINEAR),
        Rule(f"{layer}/fc1/bias", f"{hf}.mlp.fc1.bias", COPY),
        Rule(f"{layer}/fc2/kernel", f"{hf}.mlp.fc2.weight", LINEAR),
        Rule(f"{layer}/fc2/bias", f"{hf}.mlp.fc2.bias", COPY),
    ]
    return rules


def projector_rules(cfg=None, hf_prefix: str = "multi_modal_projector.", temporal: bool = False) -> list[Rule]:
    """The projector's linear layers (LLaVA's ``multi_modal_projector`` by default), plus its temporal embedding."""
    linears = ("linear_1",) if cfg is not None and cfg.type == "linear" else ("linear_1", "linear_2")
    rules = [Rule(f"{n}/{p}", f"{hf_prefix}{n}.{q}", h)
             for n in linears for p, q, h in (("kernel", "weight", LINEAR), ("bias", "bias", COPY))]
    if temporal and cfg is not None and cfg.temporal_embedding:
        rules.append(Rule("temporal_embedding", f"{hf_prefix}temporal_embedding", COPY))
    return rules


def newline_rules(model_cfg) -> list[Rule]:
    """LLaVA-NeXT / OneVision's ``image_newline`` [hidden] (concat fusion with ``anyres.newline``)."""
    a = model_cfg.get("anyres")
    if model_cfg.fusion != "concat" or a is None or not a.enabled or not a.newline:
        return []
    return [Rule("image_newline", "image_newline", COPY)]


def conditioner_rules(cfg, own_kv: bool = True) -> list[Rule]:
    """One conditioner's tensors, relative to the conditioner (torch ``nn.Linear`` / ``nn.Conv2d`` names);
    ``own_kv=False``: an attention conditioner whose visual keys / values are shared (see ``conditioner_entries``)."""
    o_proj = [Rule("o_proj/bias", "o_proj.bias", FLAT)]
    if cfg.type == "attention":
        return o_proj + [Rule("o_proj/kernel", "o_proj.weight", LINEAR2)] + [
            Rule(f"{p}/kernel", f"{p}.weight", LINEAR) for p in (("q_proj", "k_proj", "v_proj") if own_kv else ("q_proj",))]
    if cfg.type in ("mlp", "conv"):
        rules = o_proj + [
            Rule("o_proj/kernel", "o_proj.weight", LINEAR),
            Rule("x_proj/kernel", "x_proj.weight", LINEAR),
            Rule("v_proj/kernel", "v_proj.weight", LINEAR),
            Rule("v_proj/bias", "v_proj.bias", COPY),
        ]
        if cfg.type == "conv":
            rules += [Rule("conv/kernel", "conv.weight", CONV), Rule("conv/bias", "conv.bias", COPY)]
        return rules
    raise ValueError(f"unknown conditioner.type {cfg.type!r} (attention | mlp | conv)")


# Where each part sits inside the checkpoints users bring: a bare vision model, a
# full SigLIP/CLIP model, or a LLaVA(-OneVision) model in its transformers 4 or 5 layout.
VISION_PREFIXES = ("", "vision_model.", "model.vision_tower.vision_model.", "vision_tower.vision_model.",
                   "model.vision_tower.", "vision_tower.")
LLM_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "model.language_model.model.")
LM_HEAD_PREFIXES = ("", "language_model.")
PROJECTOR_PREFIXES = ("model.", "")


def detect_prefix(names, anchor: str, candidates) -> str | None:
    """The candidate prefix under which ``anchor`` exists in ``names`` (None if none does)."""
    names = set(names)
    for p in candidates:
        if p + anchor in names:
            return p
    return None


# ----------------------------------------------------------------------------- expansion


def expand(rules: list[Rule], *, num_layers: int, jax_prefix: str = "", hf_prefix: str = "", block: int | None = None,
           layers: Iterable[int] | None = None) -> list[Entry]:
    """Concrete entries. ``block`` = layers per scanned block (None: unrolled layers); ``layers``: the
    layer indices that per-layer rules expand to (default: all)."""
    out = []
    layers = tuple(range(num_layers) if layers is None else layers)
    for r in rules:
        indices = layers if "{i}" in r.jax else [None]
        for i in indices:
            hf = hf_prefix + (r.hf.format(i=i) if i is not None else r.hf)
            if i is None:
                out.append(Entry(tuple((jax_prefix + r.jax).split("/")), None, hf, r.hook))
            elif block is None:
                out.append(Entry(tuple((jax_prefix + r.jax.format(i=i)).split("/")), None, hf, r.hook))
            else:
                path = jax_prefix + r.jax.replace("layers_{i}", f"blocks/layers_{i % block}")
                out.append(Entry(tuple(path.split("/")), i // block, hf, r.hook))
    return out


def _block(model_cfg) -> int | None:
    cond = model_cfg.conditioner if model_cfg.fusion == "modulation" else None
    return scan_block_size(cond, model_cfg.llm.num_layers) if model_cfg.scan_layers else None


def llm_entries(model_cfg, jax_prefix: str = "llm/", hf_prefix: str = "") -> list[Entry]:
    """Entries for the LLM of a LaVi model config, in its layer layout."""
    return expand(llm_rules(model_cfg.llm), num_layers=model_cfg.llm.num_layers, jax_prefix=jax_prefix,
                  hf_prefix=hf_prefix, block=_block(model_cfg))


def vision_entries(model_cfg, jax_prefix: str = "vision/", hf_prefix: str = "") -> list[Entry]:
    return expand(vision_rules(model_cfg.vision), num_layers=model_cfg.vision.num_layers, jax_prefix=jax_prefix, hf_prefix=hf_prefix)


NORMS = {"attn": "input_layernorm", "mlp": "post_attention_layernorm"}  # conditioner.norms -> norm module (same name both sides)


def modulated_norms(model_cfg) -> list[str]:
    """HF module paths of the LLM norms that receive conditioner deltas (in layer order)."""
    if model_cfg.fusion != "modulation":
        return []
    cond = model_cfg.conditioner
    out = [f"model.layers.{i}.{NORMS[n]}" for i in modulated_layers(cond, model_cfg.llm.num_layers)
           for n in ("attn", "mlp") if n in cond.norms]
    return out + (["model.norm"] if cond.final_norm else [])


def conditioner_entries(model_cfg) -> list[Entry]:
    """Entries for every conditioner of a modulation model, in its layer layout."""
    if model_cfg.fusion != "modulation":
        return []
    cond = model_cfg.conditioner
    groups = len(set(kv_share_groups(cond, modulated_layers(cond, model_cfg.llm.num_layers)).values()))
    rules = conditioner_rules(cond, own_kv=not groups)
    kv = [Entry(("conditioner_kv", f"{p}_{g}", "kernel"), None,
                f"shared_conditioner.{p}.weight" if cond.shared else f"conditioner_kv.{g}.{p}.weight", LINEAR)
          for g in range(groups) for p in ("k_proj", "v_proj")]
    if cond.shared:
        return kv + expand(rules, num_layers=0, jax_prefix="llm/shared_conditioner/", hf_prefix="shared_conditioner.")
    layered = [Rule(f"layers_{{i}}/{NORMS[n]}/conditioner/{r.jax}", f"model.layers.{{i}}.{NORMS[n]}.conditioner.{r.hf}", r.hook)
               for n in ("attn", "mlp") if n in cond.norms for r in rules]
    out = expand(layered, num_layers=model_cfg.llm.num_layers, jax_prefix="llm/", block=_block(model_cfg),
                 layers=modulated_layers(cond, model_cfg.llm.num_layers))
    if cond.final_norm:
        out += expand(rules, num_layers=0, jax_prefix="llm/norm/conditioner/", hf_prefix="model.norm.conditioner.")
    return kv + out


def lavi_entries(model_cfg) -> list[Entry]:
    """The LaVi-only tensors (projector + conditioners) in the ``lavi/`` export format."""
    if model_cfg.fusion == "none":
        return []
    rules = projector_rules(model_cfg.projector, "projector.", temporal=True)
    anyres = model_cfg.get("anyres")
    if model_cfg.fusion == "modulation" and anyres is not None and anyres.enabled and anyres.tile_embedding == "grid":
        rules += [Rule(n, f"projector.{n}", COPY) for n in ("tile_base_embedding", "tile_row_embedding", "tile_col_embedding")]
    proj = expand(rules, num_layers=0, jax_prefix="projector/")
    return proj + expand(newline_rules(model_cfg), num_layers=0) + conditioner_entries(model_cfg)


def rename(entries: list[Entry], fn: Callable[[str], str]) -> list[Entry]:
    """The same entries with HF names rewritten (e.g. for LLaVA's nested prefixes)."""
    return [dataclasses.replace(e, hf=fn(e.hf)) for e in entries]
