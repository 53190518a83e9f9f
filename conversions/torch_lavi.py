"""A small PyTorch LaVi: the exported HF LLM and vision tower, with conditioner deltas on the LLM's RMSNorms.

    from conversions.torch_lavi import LaViReference
    model = LaViReference.from_pretrained(OUT)         # OUT written by conversions.export_hf
    logits = model(input_ids, pixel_values=pix, item_mask=mask)
    model.save_pretrained(OUT2)                        # same layout; conversions.import_hf --lavi OUT2

Same call contract as ``lavi_jax``: ``input_ids`` [B, T] with ``image_token_id``
opening each visual item, ``pixel_values`` [B, N, F, H, W, 3] (channels last,
processor-normalised), ``item_mask`` [B, N, F]; returns float logits [B, T, vocab].

``fusion="modulation"``: each norm listed in ``lavi/config.json``
(``modulated_norms``) gets a forward hook that recomputes its output as

    RMSNorm(h_t) * (w + dgamma_t) + dbeta_t,   (dgamma_t, dbeta_t) = Conditioner(RMSNorm_noaffine(h_t), V)

where token t sees item k iff item k's placeholder sits at or before t, and a
token that sees no item gets zero deltas. Conditioners: ``attention``, ``mlp``,
``conv``; with ``kv_share`` (``"all"`` or ``"k"`` layers per group) the
attention conditioners of a group share one visual key / value projection
(``conditioner_kv.{g}.k_proj`` / ``.v_proj``; the final norm in the last
group) and keep their own query and output projections; projector: ``mlp2x_gelu`` / ``linear`` with average pooling and a
temporal embedding; LaVi-HD (``anyres`` with ``tile_embedding="grid"``) adds a
tile-position embedding to the frames of anyres image items, whose crop grid
comes from ``image_sizes`` [B, N, 2] through transformers'
``get_anyres_image_grid_shape``. ``fusion="concat"``: each placeholder is replaced by its
item's projected visual tokens (logits returned at the text positions).
Only torch, transformers and safetensors are needed.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NO_ITEM = 2**31 - 1


class Projector(nn.Module):
    """Visual features [B, N, F, P, D] -> (tokens [B, N, F, P', width], grid)."""

    def __init__(self, cfg: dict, in_features: int, width: int, tile_grid: tuple[int, int] = (0, 0)):
        super().__init__()
        self.cfg, self.tile_grid = cfg, tuple(tile_grid)
        self.linear_1 = nn.Linear(in_features, width)
        if cfg["type"] == "mlp2x_gelu":
            self.linear_2 = nn.Linear(width, width)
        elif cfg["type"] != "linear":
            raise ValueError(f"unknown projector.type {cfg['type']!r}")
        if cfg["temporal_embedding"]:
            self.temporal_embedding = nn.Parameter(torch.zeros(cfg["max_frames"], width))
        if self.tile_grid != (0, 0):
            self.tile_base_embedding = nn.Parameter(torch.zeros(width))
            self.tile_row_embedding = nn.Parameter(torch.zeros(self.tile_grid[0], width))
            self.tile_col_embedding = nn.Parameter(torch.zeros(self.tile_grid[1], width))

    def tile_embedding(self, Fr: int, tile_cols: list[list[int]]) -> torch.Tensor:
        """[B, N, F, width]: frame 0 the base embedding, frame f >= 1 crop (f - 1) of a row-major grid."""
        rows = []
        for item_cols in tile_cols:
            items = []
            for cols in item_cols:
                frames = [self.tile_base_embedding]
                for f in range(1, Fr):
                    r, c = divmod(f - 1, max(cols, 1))
                    r, c = min(r, self.tile_grid[0] - 1), min(c, self.tile_grid[1] - 1)
                    frames.append(self.tile_row_embedding[r] + self.tile_col_embedding[c])
                items.append(torch.stack(frames))
            rows.append(torch.stack(items))
        return torch.stack(rows)

    def forward(self, feats: torch.Tensor, tile_cols: list[list[int]] | None = None):
        B, N, Fr, P, D = feats.shape
        side = math.isqrt(P)
        x, pool = feats, self.cfg["pool"]
        if pool > 1:
            x = x.reshape(B * N * Fr, side, side, D).permute(0, 3, 1, 2)
            x = F.avg_pool2d(x, pool, pool).permute(0, 2, 3, 1)
            side //= pool
            x = x.reshape(B, N, Fr, side * side, D)
        x = self.linear_1(x)
        if self.cfg["type"] == "mlp2x_gelu":
            x = self.linear_2(F.gelu(x))
        vp = self.cfg.get("video_pool", 1)
        if Fr > 1 and vp > 1:  # a video's frames, pooled as LLaVA-OneVision pools its video tokens
            out = -(-side // vp)
            y = x.reshape(B * N * Fr, side, side, -1).permute(0, 3, 1, 2)
            y = F.interpolate(y, size=(out, out), mode="bilinear", align_corners=False)
            x, side = y.permute(0, 2, 3, 1).reshape(B, N, Fr, out * out, -1), out
        temporal = 0
        if self.cfg["temporal_embedding"]:  # frames past max_frames are image crops (tile-embedded) or padding
            frames = torch.arange(Fr).clamp(max=self.cfg["max_frames"] - 1)
            temporal = self.temporal_embedding[frames][None, None, :, None, :]
        if self.tile_grid != (0, 0):
            tile_cols = tile_cols or [[0] * N for _ in range(B)]
            image = torch.tensor(tile_cols)[:, :, None, None, None] > 0
            x = x + torch.where(image, self.tile_embedding(Fr, tile_cols)[:, :, :, None, :], temporal)
        else:
            x = x + temporal
        return x, (side, side)


class Visual:
    """The visual items of one forward call: tokens [B, N, F, P, C], key_index [B, N, F], query_index [B, T]."""

    def __init__(self, tokens, key_index, query_index, grid):
        self.tokens, self.key_index, self.query_index, self.grid = tokens, key_index, query_index, grid
        per_token = key_index.reshape(key_index.shape[0], -1).repeat_interleave(tokens.shape[3], dim=1)  # [B, S]
        self.visible = per_token[:, None, :] <= query_index[:, :, None]  # [B, T, S]
        self.cache: dict = {}


class Conditioner(nn.Module):
    """Token-wise (dgamma, dbeta) from the normalised hidden state and the visual tokens a token may see."""

    def __init__(self, cfg: dict, features: int, own_kv: bool = True):
        super().__init__()
        self.cfg, self.features = cfg, features
        width, n_out = cfg["width"], len(cfg["params"])
        if cfg["type"] == "attention":
            self.q_proj = nn.Linear(features, width, bias=False)
            if own_kv:
                self.k_proj = nn.Linear(width, width, bias=False)
                self.v_proj = nn.Linear(width, width, bias=False)
        elif cfg["type"] in ("mlp", "conv"):
            self.x_proj = nn.Linear(features, width, bias=False)
            self.v_proj = nn.Linear(width, width)
            if cfg["type"] == "conv":
                self.conv = nn.Conv2d(width, width, cfg["conv_kernel"], padding="same")
        else:
            raise ValueError(f"unknown conditioner.type {cfg['type']!r}")
        self.o_proj = nn.Linear(width, n_out * features)

    def _tokens(self, vis: Visual) -> torch.Tensor:
        v = vis.tokens
        if self.cfg["type"] == "conv":
            B, N, Fr, P, C = v.shape
            h, w = vis.grid
            grid = v.reshape(B * N * Fr, h, w, C).permute(0, 3, 1, 2)
            v = F.gelu(self.conv(grid), approximate="tanh").permute(0, 2, 3, 1).reshape(B, N, Fr, P, -1)
        return v.reshape(v.shape[0], -1, v.shape[-1])

    def forward(self, x: torch.Tensor, vis: Visual, kv: "VisualKV | None" = None):
        """``kv``: the group's shared visual key / value projections (``kv_share``), else this conditioner's own."""
        B, T, _ = x.shape
        if id(self) not in vis.cache:
            vis.cache[id(self)] = self._tokens(vis)
        tokens = vis.cache[id(self)]
        visible = vis.visible
        if self.cfg["type"] == "attention":
            H = self.cfg["num_heads"]
            q = self.q_proj(x).view(B, T, H, -1)
            k_proj, v_proj = (self.k_proj, self.v_proj) if kv is None else (kv.k_proj, kv.v_proj)
            k = k_proj(tokens).view(B, tokens.shape[1], H, -1)
            v = v_proj(tokens).view(B, tokens.shape[1], H, -1)
            scores = torch.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
            scores = scores.float().masked_fill(~visible[:, None], torch.finfo(torch.float32).min)
            a = torch.einsum("bhts,bshd->bthd", scores.softmax(-1).to(v.dtype), v)
            out = self.o_proj(a.reshape(B, T, -1))
            seen = visible.any(-1)
        else:
            weights = visible.to(x.dtype)
            count = weights.sum(-1, keepdim=True)
            mean = torch.einsum("bts,bsc->btc", weights / count.clamp(min=1), tokens.to(x.dtype))
            out = self.o_proj(F.gelu(self.x_proj(x) + self.v_proj(mean), approximate="tanh"))
            seen = count[..., 0] > 0
        out = out.view(B, T, -1, self.features) * seen[:, :, None, None].to(out.dtype)
        deltas = dict(zip(self.cfg["params"], out.unbind(2)))
        return deltas.get("scale"), deltas.get("shift")


class VisualKV(nn.Module):
    """One ``kv_share`` group's visual key and value projections."""

    def __init__(self, width: int):
        super().__init__()
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)


def kv_groups(cond: dict, norms: list[str]) -> dict[str, int]:
    """Modulated norm path -> its ``kv_share`` group: k consecutive modulated layers per group, the final norm
    (``model.norm``) in the last one; ``{}`` without sharing."""
    share = str(cond.get("kv_share", "none"))
    if share == "none" or cond["shared"] or cond["type"] != "attention":
        return {}
    layers = sorted({int(p.split(".")[2]) for p in norms if p.startswith("model.layers.")})
    per = max(len(layers), 1) if share == "all" else int(share)
    group = {layer: n // per for n, layer in enumerate(layers)}
    last = max(group.values(), default=0)
    return {p: group[int(p.split(".")[2])] if p.startswith("model.layers.") else last for p in norms}


class LaViReference(nn.Module):
    """The exported LLM (+ vision tower, projector and conditioners) as one PyTorch module."""

    def __init__(self, llm: nn.Module, vision: nn.Module | None = None, lavi: dict | None = None):
        super().__init__()
        self.llm, self.vision = llm, vision
        self.lavi = lavi or {"model": {"fusion": "none"}, "modulated_norms": []}
        m = self.lavi["model"]
        self.fusion = m["fusion"]
        self._visual: Visual | None = None
        self.conditioners = nn.ModuleDict()  # keys: norm path with "." -> "/" ("shared" when shared)
        if self.fusion == "none":
            return
        vcfg = vision.config
        in_features = vcfg.hidden_size * len(m["vision"]["feature_layers"])
        hidden = llm.config.hidden_size
        anyres = m.get("anyres") or {}
        if self.fusion == "concat" and anyres.get("enabled"):
            raise ValueError("torch_lavi has no anyres concat path (unpadding, image_newline); the reference for an "
                             "anyres concat model is transformers' LlavaNext / LlavaOnevision model")
        self.hd = self.fusion == "modulation" and anyres.get("enabled") and anyres.get("tile_embedding") == "grid"
        tile = m["vision"]["image_size"]
        tile_grid = (max(h // tile for h, _ in anyres["pinpoints"]), max(w // tile for _, w in anyres["pinpoints"])) \
            if self.hd else (0, 0)
        self.projector = Projector(m["projector"], in_features,
                                   m["conditioner"]["width"] if self.fusion == "modulation" else hidden, tile_grid)
        self.kv_group: dict[str, int] = {}
        if self.fusion == "modulation":
            cond = m["conditioner"]
            self.kv_group = kv_groups(cond, self.lavi["modulated_norms"])
            if self.kv_group:
                self.conditioner_kv = nn.ModuleList(VisualKV(cond["width"]) for _ in range(max(self.kv_group.values()) + 1))
            if cond["shared"]:
                self.conditioners["shared"] = Conditioner(cond, hidden)
            for path in self.lavi["modulated_norms"]:
                if not cond["shared"]:
                    self.conditioners[path.replace(".", "/")] = Conditioner(cond, hidden, own_kv=not self.kv_group)
                self.llm.get_submodule(path).register_forward_hook(self._hook(path))

    # -------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> "LaViReference":
        import transformers
        from safetensors.torch import load_file

        llm = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(path, "llm"), dtype=dtype)
        lavi_file = os.path.join(path, "lavi", "config.json")
        if not os.path.exists(lavi_file):
            return cls(llm.eval())
        with open(lavi_file) as f:
            lavi = json.load(f)
        vdir = os.path.join(path, "vision")
        kind = lavi["model"]["vision"]["type"]
        vision_cls = transformers.SiglipVisionModel if kind == "siglip" else transformers.CLIPVisionModel
        vision = vision_cls.from_pretrained(vdir, dtype=dtype)
        model = cls(llm, vision, lavi)
        model.load_lavi_tensors(_load_tensors(os.path.join(path, "lavi"), load_file))
        return model.to(dtype).eval()

    def load_lavi_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Loads the ``lavi/`` tensors (projector + conditioners); unknown or missing names are errors."""
        parts: dict[str, tuple[nn.Module, dict]] = {"projector.": (self.projector, {})}
        if self.kv_group:
            parts["conditioner_kv."] = (self.conditioner_kv, {})
        for key, module in self.conditioners.items():
            prefix = "shared_conditioner." if key == "shared" else key.replace("/", ".") + ".conditioner."
            parts[prefix] = (module, {})
        unknown = []
        for name, t in tensors.items():
            prefix = next((p for p in parts if name.startswith(p)), None)
            if prefix is None:
                unknown.append(name)
            else:
                parts[prefix][1][name[len(prefix):]] = t
        if unknown:
            raise ValueError(f"unknown LaVi tensors: {sorted(unknown)[:10]}")
        for prefix, (module, sd) in parts.items():
            module.load_state_dict(sd, strict=True)

    def lavi_tensors(self) -> dict[str, torch.Tensor]:
        """The projector and conditioner tensors under their ``lavi/`` names."""
        out = {"projector." + k: v for k, v in self.projector.state_dict().items()}
        if self.kv_group:
            out.update({"conditioner_kv." + k: v for k, v in self.conditioner_kv.state_dict().items()})
        for key, module in self.conditioners.items():
            prefix = "shared_conditioner." if key == "shared" else key.replace("/", ".") + ".conditioner."
            out.update({prefix + k: v for k, v in module.state_dict().items()})
        return out

    def save_pretrained(self, path: str) -> None:
        """Writes the ``export_hf`` layout (``llm/``, ``vision/``, ``lavi/``), which ``import_hf --lavi`` reads."""
        from safetensors.torch import save_file

        self.llm.save_pretrained(os.path.join(path, "llm"))
        if self.fusion == "none":
            return
        self.vision.save_pretrained(os.path.join(path, "vision"))
        os.makedirs(os.path.join(path, "lavi"), exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.lavi_tensors().items()}
        save_file(tensors, os.path.join(path, "lavi", "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(path, "lavi", "config.json"), "w") as f:
            json.dump(self.lavi, f, indent=2, sort_keys=True)

    # -------------------------------------------------------------------- forward

    def _hook(self, path: str):
        def hook(module, args, output):
            vis = self._visual
            if vis is None:
                return output
            h = args[0]
            x32 = h.float()
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
            normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
            cond = self.conditioners["shared" if "shared" in self.conditioners else path.replace(".", "/")]
            dgamma, dbeta = cond(normed, vis, self.conditioner_kv[self.kv_group[path]] if self.kv_group else None)
            out = normed * (module.weight if dgamma is None else module.weight + dgamma)
            return (out if dbeta is None else out + dbeta).to(h.dtype)

        return hook

    def tile_cols(self, image_sizes) -> list[list[int]] | None:
        """Crop-grid columns of each image item (HF's grid shape), 0 for videos and padding ((0, 0) sizes)."""
        if not self.hd or image_sizes is None:
            return None
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        m = self.lavi["model"]
        pinpoints = [list(p) for p in m["anyres"]["pinpoints"]]
        return [[get_anyres_image_grid_shape((int(h), int(w)), pinpoints, m["vision"]["image_size"])[1] if h > 0 else 0
                 for h, w in row] for row in torch.as_tensor(image_sizes).tolist()]

    def encode(self, pixel_values: torch.Tensor, tile_cols: list[list[int]] | None = None):
        """[B, N, F, H, W, 3] -> (projected tokens [B, N, F, P', C], grid)."""
        m = self.lavi["model"]
        B, N, Fr = pixel_values.shape[:3]
        pix = pixel_values.reshape((B * N * Fr,) + tuple(pixel_values.shape[3:])).permute(0, 3, 1, 2)
        out = self.vision(pixel_values=pix.to(self.vision.dtype), output_hidden_states=True)
        feats = torch.cat([out.hidden_states[i] for i in m["vision"]["feature_layers"]], dim=-1)
        if m["vision"]["type"] == "clip" and m["vision"]["drop_cls"]:
            feats = feats[:, 1:]
        return self.projector(feats.reshape((B, N, Fr) + tuple(feats.shape[1:])), tile_cols)

    @staticmethod
    def item_positions(input_ids: torch.Tensor, image_token_id: int, num_items: int) -> torch.Tensor:
        """[B, N] index of each row's k-th placeholder (``NO_ITEM`` when absent)."""
        is_img = input_ids == image_token_id
        rank = is_img.long().cumsum(1) - 1
        hit = is_img[:, :, None] & (rank[:, :, None] == torch.arange(num_items)[None, None, :])
        t = torch.arange(input_ids.shape[1])[None, :, None].expand_as(hit)
        return torch.where(hit, t, torch.full_like(t, NO_ITEM)).min(1).values

    def forward(self, input_ids, pixel_values=None, item_mask=None, attention_mask=None, position_ids=None,
                image_sizes=None):
        input_ids = torch.as_tensor(input_ids).long()
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long)
        attention_mask = torch.as_tensor(attention_mask).long()
        if position_ids is None:
            position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        if pixel_values is None or self.fusion == "none":
            return self.llm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        pixel_values = torch.as_tensor(pixel_values)
        item_mask = torch.ones(pixel_values.shape[:3], dtype=torch.bool) if item_mask is None else torch.as_tensor(item_mask).bool()
        tokens, grid = self.encode(pixel_values, self.tile_cols(image_sizes))
        image_token_id = self.lavi["model"]["image_token_id"]
        if self.fusion == "concat":
            return self._concat(input_ids, tokens, item_mask, attention_mask, image_token_id)
        pos = self.item_positions(input_ids, image_token_id, pixel_values.shape[1])
        key_index = torch.where(item_mask & (pos < NO_ITEM)[:, :, None], pos[:, :, None], torch.full_like(item_mask, NO_ITEM, dtype=torch.long))
        self._visual = Visual(tokens, key_index, torch.arange(T)[None].expand(B, T), grid)
        try:
            return self.llm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        finally:
            self._visual = None

    def _concat(self, input_ids, tokens, item_mask, attention_mask, image_token_id):
        B, T = input_ids.shape
        N, Fr, P = tokens.shape[1:4]
        L = Fr * P
        text = self.llm.get_input_embeddings()(input_ids)
        T_out = T + N * (L - 1)
        embeds = text.new_zeros(B, T_out, text.shape[-1])
        mask = torch.zeros(B, T_out, dtype=torch.long)
        ends = torch.zeros(B, T, dtype=torch.long)
        for b in range(B):
            j, k = 0, 0
            for t in range(T):
                if input_ids[b, t] == image_token_id and k < N:
                    embeds[b, j:j + L] = tokens[b, k].reshape(L, -1)
                    valid = item_mask[b, k].repeat_interleave(P) & bool(attention_mask[b, t])
                    mask[b, j:j + L] = valid.long()
                    j, k = j + L, k + 1
                else:
                    embeds[b, j], mask[b, j] = text[b, t], attention_mask[b, t]
                    j += 1
                ends[b, t] = j - 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        return torch.gather(logits, 1, ends[:, :, None].expand(B, T, logits.shape[-1]))


def _load_tensors(directory: str, load_file) -> dict[str, Any]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for fn in files:
        out.update(load_file(os.path.join(directory, fn)))
    return out
