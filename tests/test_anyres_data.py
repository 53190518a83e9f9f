"""Anyres processing against Hugging Face's LLaVA-NeXT / LLaVA-OneVision PIL processors.

Photos: scikit-image's sample images shipped inside its wheel (read from the
package folder, nothing downloaded), plus random images of made-up sizes.
"""

import os

import numpy as np
import pytest
import skimage
from PIL import Image
from transformers.image_processing_utils import select_best_resolution as hf_best
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from lavi_jax import config as C
from lavi_jax.data.anyres import AnyresProcessor, check_pinpoints, grid_shape, num_crops, select_best_resolution
from lavi_jax.data.image_processor import ImageProcessor

SKIMAGE_DATA = os.path.join(os.path.dirname(skimage.__file__), "data")
# Many aspect ratios and modes: square, 3:2 both ways, tall text, RGBA, grayscale, palette GIF.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "page.png", "text.png", "horse.png", "camera.png", "coins.png", "no_time_for_that_tiny.gif")
MADE_UP = ((1, 1000), (1000, 1), (37, 19), (19, 37), (4000, 3), (3, 4000), (1, 1), (2, 2), (384, 384), (385, 769))

# LLaVA-OneVision (llava-onevision-qwen2-*-ov-hf): 384 tiles, the 36 pinpoints up to 6x6.
OV_PINPOINTS = [list(p) for p in C.ONEVISION_PINPOINTS]
# LLaVA-NeXT (llava-v1.6): 336 tiles, CLIP processing.
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY_PINPOINTS = [[h, w] for h in (32, 64, 96) for w in (32, 64, 96)]


def photo(name: str) -> Image.Image:
    with Image.open(os.path.join(SKIMAGE_DATA, name)) as image:
        image.load()
        return image


def random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed + h * 7 + w).integers(0, 256, (h, w, 3), dtype=np.uint8))


def onevision(tile: int, pinpoints):
    hf = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    mine = AnyresProcessor(ImageProcessor.siglip(tile), pinpoints, max(h * w for h, w in grid_sizes(pinpoints, tile)))
    return hf, mine


def llava_next(tile: int, pinpoints):
    hf = LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                    image_grid_pinpoints=pinpoints)
    mine = AnyresProcessor(ImageProcessor.clip(tile), pinpoints, max(h * w for h, w in grid_sizes(pinpoints, tile)))
    return hf, mine


def grid_sizes(pinpoints, tile):
    return [(h // tile, w // tile) for h, w in pinpoints]


def assert_parity(hf, mine: AnyresProcessor, image: Image.Image):
    ref = hf(image, return_tensors="np")
    expected = ref["pixel_values"][0].transpose(0, 2, 3, 1)  # [1 + C, S, S, 3]
    pixels, mask = mine(image)
    n = expected.shape[0]
    assert mask.tolist() == [True] * n + [False] * (mine.num_frames - n)
    np.testing.assert_allclose(pixels[:n], expected, rtol=0, atol=1e-6)
    assert not pixels[n:].any()
    assert tuple(ref["image_sizes"][0]) == (image.height, image.width)


@pytest.mark.parametrize("name", PHOTOS)
def test_onevision_photos(name):
    hf, mine = onevision(384, OV_PINPOINTS)
    assert mine.num_frames == 37
    assert_parity(hf, mine, photo(name))


@pytest.mark.parametrize("name", ("chelsea.png", "page.png", "horse.png", "text.png"))
def test_llava_next_photos(name):
    assert_parity(*llava_next(336, NEXT_PINPOINTS), photo(name))


@pytest.mark.parametrize("size", MADE_UP)
def test_made_up_sizes(size):
    """Extreme aspect ratios and 1x1 images are processed exactly as HF does (tiny tiles keep it fast)."""
    image = random_image(*size)
    assert_parity(*onevision(32, TINY_PINPOINTS), image)
    assert_parity(*llava_next(32, TINY_PINPOINTS), image)


def test_onevision_multi_image_is_padded_to_square():
    """A prompt with several images: HF does not tile them; each is padded with the mean colour, one frame."""
    hf, mine = onevision(32, TINY_PINPOINTS)
    images = [random_image(40, 70), random_image(90, 30), photo("page.png")]
    ref = hf([images], return_tensors="np")
    assert ref["pixel_values"].shape[1] == 1
    for k, image in enumerate(images):
        pixels, mask = mine.square(image)
        np.testing.assert_allclose(pixels[0], ref["pixel_values"][k, 0].transpose(1, 2, 0), rtol=0, atol=1e-6)
        assert mask.tolist() == [True] + [False] * (mine.num_frames - 1)
        assert not pixels[1:].any()


def test_geometry_matches_hf():
    """Best canvas, grid shape and crop count over many sizes, for both pinpoint lists."""
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(300)] + list(MADE_UP) + [(768, 1024), (512, 2048)]
    for pinpoints, tile in ((OV_PINPOINTS, 384), (NEXT_PINPOINTS, 336)):
        for size in sizes:
            assert select_best_resolution(size, pinpoints) == tuple(hf_best(size, pinpoints))
            assert grid_shape(size, pinpoints, tile) == tuple(get_anyres_image_grid_shape(size, pinpoints, tile))
            assert 1 + num_crops(size, pinpoints, tile) == image_size_to_num_patches(size, pinpoints, tile)


def test_onevision_pinpoints_are_hf_onevision_default():
    from transformers import LlavaOnevisionConfig

    assert [list(p) for p in C.ONEVISION_PINPOINTS] == LlavaOnevisionConfig().image_grid_pinpoints


def test_real_geometry_crop_counts():
    """The inputs the benchmarks quote: a 1024x768 photo and a 4:1 panorama under OneVision's pinpoints."""
    assert grid_shape((768, 1024), OV_PINPOINTS, 384) == (2, 3)
    assert grid_shape((512, 2048), OV_PINPOINTS, 384) == (2, 6)


def test_bad_pinpoints_fail_naming_the_value():
    with pytest.raises(ValueError, match=r"\(384, 500\).*multiple of .* 384"):
        check_pinpoints([[384, 384], [384, 500]], 384, 9)
    with pytest.raises(ValueError, match=r"\(1152, 1152\) gives 9 crops, more than max_crops=4"):
        check_pinpoints([[384, 384], [1152, 1152]], 384, 4)
    with pytest.raises(ValueError, match="pinpoint"):
        check_pinpoints([[384]], 384, 4)
    with pytest.raises(ValueError, match="square tiles"):
        AnyresProcessor(ImageProcessor(size=(32, 64)), [[32, 64]], 2)


# --------------------------------------------------------------------------- pipeline

def _conv(question):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "a"}]


def _pipeline_config(tmp_path, records, **overrides):
    path = tmp_path / "data.json"
    path.write_text(__import__("json").dumps(records))
    kw = dict(train_json=str(path), eval_json=str(path), image_root=str(tmp_path), image_size=32,
              seq_buckets=(64,), num_threads=1, max_bad_records=5, max_images=2, num_frames=3)
    kw.update(overrides)
    return C.data(**kw)


def test_eval_pipeline_crops_sizes_and_bad_images(tmp_path):
    """A record's crop count follows its image size within the static maximum; an image past the pixel limit
    is skipped and reported with the record id; a 1x1 and a 1x200 image are processed."""
    from lavi_jax import data as D

    sizes = {"wide": (20, 90), "tall": (90, 33), "dot": (1, 1), "strip": (1, 200), "huge": (300, 300)}
    records = []
    for name, (h, w) in sizes.items():
        random_image(h, w).save(tmp_path / f"{name}.png")
        records.append({"id": name, "image": f"{name}.png", "conversations": _conv("<image>\nq?")})
    records.append({"id": "two", "image": ["wide.png", "tall.png"], "conversations": _conv("<image><image>q?")})
    records.append({"id": "video", "video": "frames", "image": "tall.png", "conversations": _conv("q?")})
    os.makedirs(tmp_path / "frames")
    for f in range(4):
        random_image(40, 50, seed=f).save(tmp_path / "frames" / f"{f}.png")
    config = _pipeline_config(tmp_path, records, max_image_pixels=50_000)
    hf, processor = onevision(32, TINY_PINPOINTS)  # anyres_max: a multi-image record is not tiled
    processor = AnyresProcessor(processor.processor, processor.pinpoints, processor.max_crops, "anyres_max_9")
    it = D.make_eval_iterator(config, D.ByteTokenizer(), processor, batch_size=len(records), process_index=0,
                              process_count=1)
    batch = next(it)
    assert batch["pixel_values"].shape == (len(records), 2, 10, 32, 32, 3)
    assert batch["image_sizes"].shape == (len(records), 2, 2) and batch["image_sizes"].dtype == np.int32
    assert [(b.id, "ImageTooLargeError" in b.reason) for b in it.bad_records.reports] == [("huge", True)]
    valid = batch["valid"].tolist()
    assert valid == [True, True, True, True, False, True, True]
    for b, (name, (h, w)) in enumerate(list(sizes.items())[:4]):
        ref = hf(random_image(h, w), return_tensors="np")["pixel_values"][0].transpose(0, 2, 3, 1)
        n = 1 + num_crops((h, w), TINY_PINPOINTS, 32)
        assert batch["item_mask"][b, 0].tolist() == [True] * n + [False] * (10 - n)
        np.testing.assert_allclose(batch["pixel_values"][b, 0, :n], ref, rtol=0, atol=1e-6)
        assert batch["image_sizes"][b].tolist() == [[h, w], [0, 0]]
    two = batch["item_mask"][5]
    assert two[:, 0].all() and not two[:, 1:].any()  # one square frame per image of a multi-image record
    assert batch["image_sizes"][5].tolist() == [[20, 90], [90, 33]]
    video = 6  # an image (tiled: the only image) then a 3-frame video, sizes (0, 0) for the video
    assert batch["item_mask"][video, 0].sum() == 1 + num_crops((90, 33), TINY_PINPOINTS, 32)
    assert batch["item_mask"][video, 1].tolist() == [True] * 3 + [False] * 7
    # OneVision's video frames: each sampled frame resized to one tile and normalised (no tiling); the PIL
    # reference is HF's SigLIP processor with OneVision's video settings (its own video processor needs torchvision).
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    frame_ref = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    for f, k in enumerate((0, 2, 3)):  # 3 of 4 frames sampled uniformly
        ref = frame_ref(random_image(40, 50, seed=k), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        np.testing.assert_allclose(batch["pixel_values"][video, 1, f], ref, rtol=0, atol=1e-6)
    assert batch["image_sizes"][video].tolist() == [[90, 33], [0, 0]]


def test_train_pipeline_off_has_no_image_sizes(tmp_path):
    from lavi_jax import data as D

    random_image(20, 90).save(tmp_path / "a.png")
    config = _pipeline_config(tmp_path, [{"id": "a", "image": "a.png", "conversations": _conv("q?")}])
    batch = next(D.make_train_iterator(config, D.ByteTokenizer(), batch_size=1, process_index=0, process_count=1))
    assert "image_sizes" not in batch and batch["item_mask"].shape == (1, 2, 3)
    hf, processor = onevision(32, TINY_PINPOINTS)
    for packing in (False, True):
        config.packing = packing
        batch = next(D.make_train_iterator(config, D.ByteTokenizer(), processor, batch_size=1, process_index=0,
                                           process_count=1))
        n = 1 + num_crops((20, 90), TINY_PINPOINTS, 32)
        assert batch["item_mask"].shape == (1, 2, 10) and batch["item_mask"][0, 0].sum() == n
        used = batch["item_mask"][0, :, 0]  # packed: the one record fills the row twice
        assert used.tolist() == ([True, True] if packing else [True, False])
        assert batch["image_sizes"][0].tolist() == [[20, 90] if u else [0, 0] for u in used]
