"""Hugging Face (and LaVi export) checkpoints -> lavi_jax model config and sharded params.

Sources: Qwen2 / Qwen2.5, LLaMA 1/2/3/3.1, Vicuna, Mistral without sliding
window; SigLIP / CLIP vision models (bare, or a full SiglipModel / CLIPModel);
``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration`` and
``LlavaOnevisionForConditionalGeneration``; directories written by
:func:`lavi_jax.hf.export_params`. The model config is derived from the
``config.json`` files (LaVi-only knobs from ``base`` or the defaults); the
default fusion is ``concat`` for a LLaVA source (the source model itself),
``modulation`` with a vision tower, else ``none``. Conditioners and the
projector are freshly initialised (zero output projections) unless the source
has them.

A LLaVA-NeXT / OneVision source imported with concat fusion keeps its anyres
geometry (``config.model.anyres``: ``image_grid_pinpoints``, OneVision's
``vision_aspect_ratio``, ``max_crops`` from the largest pinpoint) and its
``image_newline``, and has no temporal embedding, so its logits equal HF's on
the same tiles (:mod:`lavi_jax.models.anyres`). With another fusion only its
towers (and LLM) are taken.

Tensors are read one at a time and placed straight into their shards on the
mesh (:mod:`lavi_jax.hf.placement`); only the leaves no source provides are
initialised.

Never imported: SigLIP's pooling head and CLIP/SigLIP text towers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lavi_jax import config as C
from lavi_jax import sharding, storage
from lavi_jax.data.tokenizer import image_token_id_in
from lavi_jax.hf import config as hf_config
from lavi_jax.hf import hub, mapping
from lavi_jax.hf.errors import ConversionError, UnsupportedModel
from lavi_jax.hf.placement import check_shapes, flatten, place_entries, unflatten
from lavi_jax.hf.safetensors_io import SafetensorsReader
from lavi_jax.models.lavi import LaVi

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "vocab.txt")
LAVI_DIR = "lavi"  # export layout: OUT/llm, OUT/vision, OUT/lavi

# Tensors some sources carry that LaVi has no use for (never an error).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TEXT_TOWER = ("text_model.", "logit_scale", "logit_bias", "text_projection.", "visual_projection.")


@dataclasses.dataclass
class Source:
    """One checkpoint directory and what is taken from it."""

    path: str
    entries: list = dataclasses.field(default_factory=list)
    unused: dict = dataclasses.field(default_factory=dict)  # name prefix -> why it is not imported
    reader: SafetensorsReader | None = None

    def open(self) -> SafetensorsReader:
        if self.reader is None:
            self.reader = SafetensorsReader(self.path)
        return self.reader


# ----------------------------------------------------------------------------- planning


def _llm_entries(cfg, names) -> list[mapping.Entry]:
    """LLM entries renamed to where the checkpoint keeps the LLM (plain causal LM or inside LLaVA)."""
    prefix = mapping.detect_prefix(names, "embed_tokens.weight", mapping.LLM_PREFIXES)
    if prefix is None:
        raise ConversionError("no LLM found in checkpoint: no tensor named like 'model.embed_tokens.weight'")
    head = mapping.detect_prefix(names, "lm_head.weight", mapping.LM_HEAD_PREFIXES) or ""
    return mapping.rename(mapping.llm_entries(cfg), lambda n: prefix + n[len("model."):] if n.startswith("model.") else head + n)


def _vision_prefix(names) -> str:
    prefix = mapping.detect_prefix(names, "embeddings.patch_embedding.weight", mapping.VISION_PREFIXES)
    if prefix is None:
        raise ConversionError("no vision tower found in checkpoint: no tensor named like 'embeddings.patch_embedding.weight'")
    return prefix


def _vision_entries(cfg, names) -> list[mapping.Entry]:
    prefix = _vision_prefix(names)
    return mapping.rename(mapping.vision_entries(cfg), lambda n: prefix + n)


def read_lavi_config(path: str) -> tuple[str, dict]:
    """``(export dir, lavi/config.json)`` for an export dir or its ``lavi/`` subdir (local or a URI)."""
    for root in (storage.absolute(path), storage.parent(path)):
        file = storage.join(root, LAVI_DIR, "config.json")
        if storage.isfile(file):
            raw = storage.read_json(file)
            if raw.get("model_type") != "lavi":
                raise UnsupportedModel(f"{file}: model_type {raw.get('model_type')!r} is not 'lavi'")
            return root, raw
    raise FileNotFoundError(f"no {LAVI_DIR}/config.json in {path} (expected a directory written by export_hf)")


def plan(llm_dir: str | None = None, vision_dir: str | None = None, base: C.ConfigDict | None = None, *,
         llava_dir: str | None = None, lavi_dir: str | None = None, fusion: str | None = None,
         dtype: str | None = None, scan: bool | None = None) -> tuple[C.ConfigDict, list[Source]]:
    """The model config and, per checkpoint directory, the entries to read from it.

    ``llm_dir``, ``vision_dir`` and ``llava_dir`` are local directories, URIs (``gs://...``) or Hugging Face Hub
    ids (``org/name[@revision]``, :func:`lavi_jax.hf.hub.resolve`); ``lavi_dir`` is a local directory or a URI."""
    llm_dir, vision_dir, llava_dir = hub.resolve(llm_dir), hub.resolve(vision_dir), hub.resolve(llava_dir)
    for given_dir in (llm_dir, vision_dir, llava_dir, lavi_dir):
        if given_dir:
            storage.check_readable(given_dir)  # one line naming it: missing, or its store unreachable
    given = [n for n, v in (("--llm", llm_dir), ("--llava", llava_dir), ("--lavi", lavi_dir)) if v]
    if len(given) != 1:
        raise ValueError(f"give exactly one of --llm, --llava, --lavi (got {given or 'none'})")
    if vision_dir and not llm_dir:
        raise ValueError("--vision goes with --llm (--llava and --lavi bring their own vision tower)")
    if lavi_dir:
        root, raw = read_lavi_config(lavi_dir)
        base = C.ConfigDict(raw["model"])
        llm_dir = storage.join(root, "llm")
        vision_dir = storage.join(root, "vision") if storage.isdir(storage.join(root, "vision")) else None
    m = C.model() if base is None else C.ConfigDict(base.to_dict())
    if fusion:
        m.fusion = fusion
    elif base is None:
        m.fusion = "concat" if llava_dir else "modulation" if vision_dir else "none"
    if dtype:
        m.param_dtype = dtype
    if scan is not None:
        m.scan_layers = bool(scan)
    if llava_dir:
        m.llm, vision, extras = hf_config.llava_from_hf(hf_config.read_config(llava_dir))
        if m.fusion != "none":
            m.vision = vision
        m.image_token_id = extras["image_token_id"]
        if m.fusion == "concat" and (m.projector.type != "mlp2x_gelu" or m.projector.pool != 1):
            raise ValueError("LLaVA's projector is mlp2x_gelu without pooling; set projector.type='mlp2x_gelu', pool=1")
        if m.fusion == "concat" and extras["anyres"] is not None:  # the source's tiling, newline and no temporal table
            m.anyres = extras["anyres"]
            m.projector.temporal_embedding = False
    else:
        m.llm = hf_config.llm_from_hf(hf_config.read_config(llm_dir))
        if vision_dir is not None:
            if m.fusion == "none":
                raise ValueError("--vision given but fusion='none' has no vision tower")
            keep = {k: m.vision[k] for k in ("feature_layers", "drop_cls")}
            m.vision = hf_config.vision_from_hf(hf_config.read_config(vision_dir), **keep)
        elif m.fusion != "none":
            raise ValueError(f"fusion={m.fusion!r} needs a vision tower: pass --vision (or use --fusion none)")
        if not lavi_dir:
            tok_id = image_token_id_in(storage.local_dir(llm_dir, ("tokenizer.json",)))
            if tok_id is not None and tok_id < m.llm.vocab_size:
                m.image_token_id = tok_id
    if m.image_token_id >= m.llm.vocab_size:
        m.image_token_id = m.llm.vocab_size - 1

    sources: list[Source] = []
    if llava_dir:
        src = Source(llava_dir)
        names = src.open().names()
        src.entries = _llm_entries(m, names)
        vprefix = _vision_prefix(names)
        pprefix = mapping.detect_prefix(names, "multi_modal_projector.linear_1.weight", mapping.PROJECTOR_PREFIXES) or ""
        src.unused[vprefix + "head."] = "SigLIP pooling head (unused by LLaVA)"
        if m.fusion == "none":
            src.unused[vprefix] = "vision tower (fusion='none')"
        else:
            src.entries += mapping.rename(mapping.vision_entries(m), lambda n: vprefix + n)
        if m.fusion == "concat":
            proj = mapping.expand(mapping.projector_rules(m.projector), num_layers=0, jax_prefix="projector/")
            src.entries += mapping.rename(proj, lambda n: pprefix + n)
        else:
            src.unused[pprefix + "multi_modal_projector."] = f"LLaVA projector (fusion={m.fusion!r} uses its own)"
        newline = mapping.expand(mapping.newline_rules(m), num_layers=0)
        if newline:
            nprefix = mapping.detect_prefix(names, "image_newline", mapping.PROJECTOR_PREFIXES) or ""
            src.entries += mapping.rename(newline, lambda n: nprefix + n)
        else:
            for p in ("image_newline", "model.image_newline"):
                src.unused[p] = f"anyres newline embedding (fusion={m.fusion!r} does not use it)"
        sources.append(src)
    else:
        src = Source(llm_dir)
        src.entries = _llm_entries(m, src.open().names())
        sources.append(src)
        if vision_dir is not None:
            vsrc = next((s for s in sources if storage.absolute(s.path) == storage.absolute(vision_dir)), None)
            if vsrc is None:
                vsrc = Source(vision_dir)
                sources.append(vsrc)
            names = vsrc.open().names()
            prefix = _vision_prefix(names)
            vsrc.entries += mapping.rename(mapping.vision_entries(m), lambda n: prefix + n)
            vsrc.unused[prefix + "head."] = "SigLIP pooling head"
            for p in TEXT_TOWER:
                vsrc.unused[p] = "text tower / contrastive head"
        if lavi_dir:
            root, _ = read_lavi_config(lavi_dir)
            lsrc = Source(storage.join(root, LAVI_DIR))
            lsrc.entries = mapping.lavi_entries(m)
            if lsrc.entries:
                sources.append(lsrc)
    return m, sources


def check_names(source: Source, strict: bool = True) -> list[str]:
    """Fails on tensors the mapping needs but the checkpoint lacks (and, when ``strict``, on unknown
    extra tensors). Returns notes on the known tensors that are not imported."""
    reader = source.open()
    wanted = {e.hf for e in source.entries}
    have = set(reader.names())
    missing = sorted(wanted - have)
    if missing:
        raise ConversionError(f"missing tensor {missing[0]!r} in {source.path}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    notes: dict[str, int] = {}
    extra = []
    for n in sorted(have - wanted):
        if n.endswith(IGNORED_SUFFIXES):
            continue
        why = next((w for p, w in source.unused.items() if n.startswith(p)), None)
        if why is None:
            extra.append(n)
        else:
            notes[why] = notes.get(why, 0) + 1
    if extra and strict:
        raise ConversionError(f"{len(extra)} unknown tensor(s) in {source.path} not used by the mapping: "
                              + ", ".join(extra[:10]) + (", ..." if len(extra) > 10 else ""))
    return [f"not imported from {source.path}: {n} tensor(s) of the {why}" for why, n in notes.items()]


# ----------------------------------------------------------------------------- building params


def build_params(cfg: C.ConfigDict, sources: list[Source], mesh, seed: int = 0) -> dict:
    """Params of ``cfg`` on ``mesh``: every mapped leaf read from its source, the rest initialised."""
    model = LaVi(cfg)
    ids = jnp.zeros((1, 8), jnp.int32)
    abstract, specs = sharding.abstract_params(model, ids)
    shardings = dict(flatten(sharding.logical_to_sharding(specs, mesh, abstract)))
    targets = {p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings[p]) for p, a in flatten(abstract)}
    for s in sources:
        check_shapes(s.entries, s.open().shape, targets)
    mapped = {e.jax for s in sources for e in s.entries}
    rest = [p for p in targets if p not in mapped]
    flat = {}
    if rest:
        def init(rng):
            full = dict(flatten(nn.unbox(model.init(rng, ids)["params"])))
            return {"/".join(p): full[p] for p in rest}

        # The "rbg" generator compiles far faster than threefry for a whole model's initialisers.
        with sharding.use_mesh(mesh):
            fresh = jax.jit(init, out_shardings={"/".join(p): shardings[p] for p in rest})(jax.random.key(seed, impl="rbg"))
        flat.update({tuple(k.split("/")): v for k, v in fresh.items()})
    for s in sources:
        flat.update(place_entries(s.entries, s.open(), targets))
    return unflatten({p: flat[p] for p in targets})


def import_hf(llm_dir: str | None = None, vision_dir: str | None = None, base: C.ConfigDict | None = None, *,
              llava_dir: str | None = None, lavi_dir: str | None = None, fusion: str | None = None,
              dtype: str | None = None, scan: bool | None = None, mesh=None, seed: int = 0, strict: bool = True,
              log: Callable[[str], None] | None = None) -> tuple[C.ConfigDict, dict]:
    """Returns ``(model_config, params)`` with params sharded on ``mesh`` (default: all devices, data-parallel)."""
    cfg, sources = plan(llm_dir, vision_dir, base, llava_dir=llava_dir, lavi_dir=lavi_dir, fusion=fusion,
                        dtype=dtype, scan=scan)
    try:
        for s in sources:
            for note in check_names(s, strict):
                (log or (lambda _: None))(note)
        params = build_params(cfg, sources, mesh or sharding.make_mesh(), seed)
    finally:
        for s in sources:
            if s.reader is not None:
                s.reader.close()
    return cfg, params


def model_config_from_hf(llm_dir: str, vision_dir: str | None = None, base: C.ConfigDict | None = None) -> C.ConfigDict:
    """A LaVi model config whose LLM (and vision tower) geometry is the HF checkpoints'."""
    return plan(llm_dir, vision_dir, base)[0]


# ----------------------------------------------------------------------------- around the checkpoint


def tokenizer_source(llm_dir: str | None = None, llava_dir: str | None = None, lavi_dir: str | None = None) -> str | None:
    """The directory whose tokenizer files go with the imported checkpoint (a Hub id resolved to its snapshot)."""
    if lavi_dir:
        return storage.join(read_lavi_config(lavi_dir)[0], "llm")
    return hub.resolve(llm_dir or llava_dir)


def copy_tokenizer(src: str, dst: str) -> bool:
    """Copies the tokenizer files of ``src`` into ``dst`` (either local or a URI); False when there are none."""
    return storage.isdir(src) and bool(storage.copy_tree(src, dst, names=TOKENIZER_FILES))


def full_config(model_cfg: C.ConfigDict, config: C.ConfigDict | None = None) -> C.ConfigDict:
    """The run config saved with the checkpoint: ``config`` (default: the defaults) with this model."""
    config = C.experiment(model_cfg) if config is None else C.ConfigDict(config.to_dict())
    config.model = model_cfg
    if "data" not in config:
        config.data = C.data()
    if model_cfg.fusion != "none":
        config.data.image_size = model_cfg.vision.image_size
        config.data.processor = model_cfg.vision.type
    return config
