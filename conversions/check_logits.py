"""Compare a lavi_jax checkpoint's logits with a PyTorch model's on the same input.

    python -m conversions.check_logits --ckpt CKPT_DIR --hf HF_DIR [--image PATH ...] [--prompt TEXT] [--atol 1e-4]

``HF_DIR`` is one of

* a ``conversions.export_hf`` directory (``llm/``, ``vision/``, ``lavi/``): compared
  with :class:`conversions.torch_lavi.LaViReference` (text, or text + images);
* an HF LLaVA directory (``LlavaForConditionalGeneration``, concat fusion): its
  image placeholders are expanded to the number of visual tokens HF expects;
* an HF LLaVA-NeXT / LLaVA-OneVision directory (``LlavaNextForConditionalGeneration``,
  ``LlavaOnevisionForConditionalGeneration``, imported with its anyres geometry):
  HF's side processes the images with the directory's own image processor
  (``preprocessor_config.json``, PIL backend), ours with the checkpoint's; each
  placeholder is expanded to as many tokens as HF's model packs for its image;
* an HF causal-LM directory: text only.

``CKPT_DIR`` and ``HF_DIR`` may be URIs (``gs://bucket/dir``); PyTorch's side
reads a local copy of ``HF_DIR`` (:func:`local_hf_dir`).

The prompt is tokenised with the checkpoint's tokenizer (else ``HF_DIR``'s);
each ``<image>`` in it becomes one placeholder (one is prepended when images are
given and the prompt has none). Without a tokenizer, fixed pseudo-random token
ids are used. Prints the max abs logit difference, the mean KL(reference || ours)
and the top-1 agreement; exits 1 when the difference exceeds ``--atol``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from lavi_jax import storage
from lavi_jax.data.tokenizer import IMAGE_TOKEN

EXPORT_SUBDIRS = ("llm", "vision", "lavi")


def _tokenizer_dir(*dirs):
    for d in dirs:
        if d and any(storage.isfile(storage.join(d, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            return d
    return None


def local_hf_dir(hf_dir: str) -> str:
    """``hf_dir`` as a local directory ``transformers`` can read: itself when local; for a URI, its files and those
    of its ``llm/``, ``vision/``, ``lavi/`` subfolders copied into a local cache (:func:`lavi_jax.storage.local_dir`)."""
    if storage.is_local(hf_dir):  # transformers reads local files only: a URI needs a copy
        return storage.absolute(hf_dir)
    root = storage.local_dir(hf_dir)
    for sub in EXPORT_SUBDIRS:
        if storage.isdir(storage.join(hf_dir, sub)):
            storage.copy_tree(storage.join(hf_dir, sub), os.path.join(root, sub))
    return root


def input_ids(prompt: str, tokenizer_path: str | None, image_token_id: int, vocab: int, n_images: int) -> np.ndarray:
    """[1, T] int ids for ``prompt`` with one placeholder per ``<image>``."""
    if n_images and IMAGE_TOKEN not in prompt:
        prompt = IMAGE_TOKEN * n_images + "\n" + prompt
    if tokenizer_path is None:
        rng = np.random.default_rng(0)
        ids = [int(i) for i in rng.integers(0, min(vocab, 32000), 16) if i != image_token_id][:12]
        return np.asarray([[image_token_id] * n_images + ids], np.int32)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(storage.local_dir(tokenizer_path), trust_remote_code=False)
    ids: list[int] = []
    for i, part in enumerate(prompt.split(IMAGE_TOKEN)):
        if i:
            ids.append(image_token_id)
        if part:
            ids += tok(part, add_special_tokens=i == 0)["input_ids"]
    if any(i >= vocab for i in ids):
        raise ValueError(f"tokenizer produced ids beyond the model's vocab ({vocab})")
    return np.asarray([ids], np.int32)


def load_pixels(paths: list[str], model_cfg, processor: str | None) -> dict:
    """The model's visual inputs: ``pixel_values`` [1, N, F, H, W, 3] (F = 1, or 1 + max_crops for an anyres
    model, with ``item_mask`` and ``image_sizes``)."""
    from lavi_jax.data.anyres import AnyresProcessor
    from lavi_jax.data.image_processor import load_image, make_image_processor
    from lavi_jax.models import anyres

    proc = make_image_processor(processor or model_cfg.vision.type, model_cfg.vision.image_size)
    images = [load_image(p) for p in paths]
    if not anyres.enabled(model_cfg):
        return {"pixel_values": np.stack([proc(im) for im in images])[None, :, None].astype(np.float32)}
    tiler = AnyresProcessor.from_config(model_cfg.anyres, proc)
    tile = tiler.square if len(images) > 1 and not tiler.tiles_multi_images else tiler
    frames = [tile(im) for im in images]
    return {"pixel_values": np.stack([f[0] for f in frames])[None], "item_mask": np.stack([f[1] for f in frames])[None],
            "image_sizes": np.asarray([[[im.height, im.width] for im in images]], np.int32)}


def compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Max abs diff, mean KL(ref || ours) and top-1 agreement over positions ([T, V] each)."""
    ours, ref = ours.astype(np.float64), ref.astype(np.float64)
    lp = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
    lq = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    kl = (np.exp(lq) * (lq - lp)).sum(-1)
    return {"max_abs_diff": float(np.abs(ours - ref).max()), "mean_kl": float(kl.mean()),
            "top1_agreement": float((ours.argmax(-1) == ref.argmax(-1)).mean()), "positions": int(ours.shape[0])}


def expand_placeholders(ids: np.ndarray, image_token_id: int, counts: list[int]) -> tuple[list[int], list[int]]:
    """HF's row (the k-th placeholder repeated ``counts[k]`` times) and where each of our tokens sits in it."""
    row, pos, k = [], [], 0
    for t in ids[0]:
        if t == image_token_id and k < len(counts):
            row += [image_token_id] * counts[k]
            k += 1
        else:
            row.append(int(t))
        pos.append(len(row) - 1)
    return row, pos


def anyres_reference(hf_dir: str, model_type: str, ids: np.ndarray, paths: list[str]) -> tuple[np.ndarray, str]:
    """Logits [T, V] of HF LLaVA-NeXT / OneVision on ``paths`` processed by ``hf_dir``'s image processor."""
    import torch
    import transformers

    from lavi_jax.data.image_processor import load_image

    if not os.path.isfile(os.path.join(hf_dir, "preprocessor_config.json")):
        raise ValueError(f"{hf_dir} has no preprocessor_config.json (HF's side of an image check needs its processor)")
    proc = transformers.AutoImageProcessor.from_pretrained(hf_dir, backend="pil")
    images = [load_image(p) for p in paths]
    cls = transformers.LlavaNextForConditionalGeneration if model_type == "llava_next" else transformers.LlavaOnevisionForConditionalGeneration
    model = cls.from_pretrained(hf_dir, dtype=torch.float32).eval()
    kw = {}
    if model_type == "llava_onevision":  # a multi-image prompt is not tiled
        out = proc(images=[images], return_tensors="pt")
        kw["batch_num_images"] = torch.tensor([len(images)])
    else:
        out = proc(images=images, return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=out["pixel_values"], image_sizes=out["image_sizes"], **kw)
        row, pos = expand_placeholders(ids, model.config.image_token_id, [f.shape[0] for f in feats.pooler_output])
        logits = model(input_ids=torch.tensor([row]), pixel_values=out["pixel_values"], image_sizes=out["image_sizes"],
                       **kw).logits[0].numpy()
    return logits[pos], cls.__name__


def reference_logits(hf_dir: str, ids: np.ndarray, visual: dict, model_cfg,
                     paths: list[str] | None = None) -> tuple[np.ndarray, str]:
    """Logits [T, V] of the PyTorch side, and what it was (``visual``: :func:`load_pixels`' arrays, empty for
    text; the export's reference also takes an anyres item's ``item_mask`` and ``image_sizes``)."""
    import torch

    pixels = visual.get("pixel_values")

    if os.path.isfile(os.path.join(hf_dir, "llm", "config.json")):
        from conversions.torch_lavi import LaViReference

        ref = LaViReference.from_pretrained(hf_dir)
        extra = {k: torch.from_numpy(np.asarray(v)) for k, v in visual.items() if k in ("item_mask", "image_sizes")}
        with torch.no_grad():
            logits = ref(torch.from_numpy(ids), None if pixels is None else torch.from_numpy(pixels), **extra)
        return logits[0].float().numpy(), "conversions.torch_lavi.LaViReference"
    import transformers

    with open(os.path.join(hf_dir, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type in ("llava_next", "llava_onevision") and pixels is not None:
        from lavi_jax.models import anyres

        if not anyres.enabled(model_cfg):
            raise ValueError(f"{hf_dir} is {model_type} (anyres) but the checkpoint has no anyres geometry; "
                             "import it with --fusion concat")
        return anyres_reference(hf_dir, model_type, ids, paths)
    if model_type in ("llava", "llava_next", "llava_onevision"):
        cls = {"llava": transformers.LlavaForConditionalGeneration, "llava_next": transformers.LlavaNextForConditionalGeneration,
               "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration}[model_type]
        model = cls.from_pretrained(hf_dir, dtype=torch.float32).eval()
        img = model_cfg.image_token_id
        if pixels is None:
            with torch.no_grad():
                return model(input_ids=torch.from_numpy(ids).long()).logits[0].numpy(), cls.__name__
        P = (model_cfg.vision.image_size // model_cfg.vision.patch_size) ** 2
        row, pos = expand_placeholders(ids, img, [P] * pixels.shape[1])
        pix = torch.from_numpy(pixels[0, :, 0].transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row]), pixel_values=pix).logits[0].numpy()
        return logits[pos], cls.__name__
    if pixels is not None:
        raise ValueError(f"{hf_dir} is a text-only model; --image needs an export_hf directory or an HF LLaVA directory")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids).long()).logits[0].numpy(), type(model).__name__


def run(ckpt: str, hf_dir: str, images: list[str] | None = None, prompt: str = "Describe the image.",
        atol: float = 1e-4) -> dict:
    import jax
    import jax.numpy as jnp

    import lavi_jax
    from lavi_jax.checkpoint import read_config, tokenizer_dir

    config = read_config(ckpt)
    m = config.model
    if images and m.fusion == "none":
        raise ValueError("the checkpoint has no vision tower (fusion='none'); drop --image")
    storage.check_readable(hf_dir)
    tok = _tokenizer_dir(tokenizer_dir(ckpt), hf_dir, storage.join(hf_dir, "llm"))
    hf_dir = local_hf_dir(hf_dir)
    ids = input_ids(prompt, tok, m.image_token_id, m.llm.vocab_size, len(images or []))
    processor = config.data.processor if "data" in config else None
    visual = load_pixels(images, m, processor) if images else {}
    model, params = lavi_jax.load(ckpt)
    kw = {k: jnp.asarray(v) for k, v in visual.items()}
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids), **kw))[0]
    ref, what = reference_logits(hf_dir, ids, visual, m, images)
    stats = compare(ours, ref)
    stats.update(reference=what, tokens=int(ids.shape[1]), images=len(images or []), tokenizer=tok or "none (fixed ids)",
                 atol=atol, ok=stats["max_abs_diff"] <= atol)
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m conversions.check_logits", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="lavi_jax checkpoint")
    p.add_argument("--hf", required=True, help="export_hf directory, HF LLaVA / LLaVA-NeXT / LLaVA-OneVision directory "
                   "or HF causal-LM directory")
    p.add_argument("--image", action="append", help="image file (repeat for several)")
    p.add_argument("--prompt", default="Describe the image.")
    p.add_argument("--atol", type=float, default=1e-4)
    a = p.parse_args(argv)
    try:
        s = run(a.ckpt, a.hf, a.image, a.prompt, a.atol)
    except (ValueError, FileNotFoundError) as e:
        print(f"check_logits: error: {e}", file=sys.stderr)
        return 2
    print(f"reference        {s['reference']}")
    print(f"input            {s['tokens']} tokens, {s['images']} image(s), tokenizer: {s['tokenizer']}")
    print(f"max abs diff     {s['max_abs_diff']:.3e}  (atol {s['atol']:.1e})")
    print(f"mean KL          {s['mean_kl']:.3e}")
    print(f"top-1 agreement  {s['top1_agreement']:.4f} over {s['positions']} positions")
    print("OK" if s["ok"] else "FAIL: logits differ by more than --atol")
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
