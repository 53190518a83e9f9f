"""Data pipeline tests: processors, video, tokenisers, records, grain pipelines, synthetic set."""

import json
import os
import struct
import zlib

import av
import numpy as np
import pytest
from PIL import Image

from lavi_jax import data as D
from lavi_jax import config as C
from lavi_jax.demo import synthetic
from lavi_jax.demo.synthetic import write_synthetic_vqa

# --------------------------------------------------------------------------- helpers


def _noise_image(mode, size, seed):
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").quantize(64)
    return rgba.convert(mode)


def _test_images():
    images = [_noise_image(m, s, i) for i, (m, s) in enumerate([
        ("RGB", (50, 37)), ("RGBA", (23, 61)), ("L", (64, 64)), ("LA", (40, 30)), ("CMYK", (33, 33)),
        ("P", (45, 70)), ("I;16", (30, 44)), ("1", (27, 19)),
    ])]
    with_key = _noise_image("P", (31, 29), 99)
    with_key.info["transparency"] = 3  # palette transparency, composited onto white
    images.append(with_key)
    return images


def _byte_conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def _save_png(path, colour=(200, 30, 30), size=(20, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _write_mp4(path, num_frames, size=(64, 48)):
    """Frame i is uniform grey at level 10 * i + 20."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qp": "0"}
        for i in range(num_frames):
            pixels = np.full((size[1], size[0], 3), 10 * i + 20, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def _bomb_png(path, side=100_000):
    """A PNG whose header claims side x side pixels (a few hundred bytes on disk)."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _records_dataset(tmp_path, n, prefix="q"):
    """n good records with unique questions, each with its own image."""
    records = []
    for i in range(n):
        _save_png(tmp_path / "img" / f"{i}.png", colour=(i * 7 % 256, 100, 50))
        records.append({"id": f"r{i}", "image": f"img/{i}.png",
                        "conversations": _byte_conv(f"{prefix}{i}?", f"a{i}")})
    return records


def _config(tmp_path, records, **overrides):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    defaults = dict(train_json=str(path), eval_json=str(path), image_root=str(tmp_path), image_size=16,
                    seq_buckets=(32, 64), num_threads=2, max_bad_records=0)
    defaults.update(overrides)
    return C.data(**defaults)


def _question_ids(batch, tok=D.ByteTokenizer()):
    """Record numbers of a batch of ``_records_dataset`` samples, from their text."""
    out = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        text = tok.decode(ids[mask == 1])
        out.append(int(text.split("q", 1)[1].split("?")[0]))
    return out


def _check_batches(it, expected):
    for want in expected:
        got = next(it)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


# --------------------------------------------------------------------------- image processor


def _hf_processor(name):
    """The PIL-backend HF processor (what ``SiglipImageProcessor`` / ``CLIPImageProcessor``
    resolve to without torchvision): the reference numerics."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def test_siglip_matches_hf():
    hf = _hf_processor("SiglipImageProcessor")(size={"height": 32, "width": 32})
    ours = D.ImageProcessor.siglip(32)
    for image in _test_images():
        expected = hf(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        got = ours(image)
        assert got.dtype == np.float32 and got.shape == (32, 32, 3)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=image.mode)


def test_clip_matches_hf(tmp_path):
    hf = _hf_processor("CLIPImageProcessor")(size={"shortest_edge": 30}, crop_size={"height": 28, "width": 28})
    hf.save_pretrained(tmp_path)
    loaded = D.ImageProcessor.from_hf_dir(str(tmp_path))
    built = D.ImageProcessor(size={"shortest_edge": 30}, crop_size=28, image_mean=D.image_processor.CLIP_MEAN,
                             image_std=D.image_processor.CLIP_STD)
    assert loaded == built
    assert D.ImageProcessor.clip(28).output_size == (28, 28)
    for image in _test_images():
        expected = hf(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        np.testing.assert_allclose(loaded(image), expected, rtol=0, atol=1e-6, err_msg=image.mode)


def test_legacy_hf_configs():
    legacy_clip = {"feature_extractor_type": "CLIPFeatureExtractor", "size": 224, "crop_size": 224, "resample": 3}
    assert D.ImageProcessor.from_hf_config(legacy_clip) == D.ImageProcessor.clip(224)
    siglip = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 384}}
    assert D.ImageProcessor.from_hf_config(siglip) == D.ImageProcessor.siglip(384)
    assert D.make_image_processor("siglip", 224).output_size == (224, 224)


def test_transparency_composited_on_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    pixels = D.ImageProcessor(size=(4, 4), do_normalize=False)(image)
    np.testing.assert_array_equal(pixels, np.ones((4, 4, 3), np.float32))


# --------------------------------------------------------------------------- video


def test_video_frames_sampled_uniformly(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_mp4(path, num_frames=20)
    frames = D.load_video(str(path), 5)
    assert D.sample_indices(20, 5) == [0, 5, 10, 14, 19]
    levels = [np.asarray(f.convert("RGB"), np.float32).mean() for f in frames]
    np.testing.assert_allclose(levels, [10 * i + 20 for i in (0, 5, 10, 14, 19)], atol=3)
    assert len(D.load_video(str(path), 30)) == 20  # short videos give all their frames


def test_frame_folder_natural_order(tmp_path):
    for i in range(12):
        _save_png(tmp_path / "frames" / f"frame_{i + 1}.png", colour=(i * 20, 0, 0))
    frames = D.load_video(str(tmp_path / "frames"), 4)
    reds = [np.asarray(f)[0, 0, 0] for f in frames]
    assert reds == [20 * i for i in D.sample_indices(12, 4)] == [0, 80, 140, 220]


def test_video_record_item_mask(tmp_path):
    _write_mp4(tmp_path / "v.mp4", num_frames=3)
    record = {"id": "v", "video": "v.mp4", "conversations": _byte_conv("<video> what?", "grey")}
    builder = D.ExampleBuilder(D.ByteTokenizer(), D.ImageProcessor.siglip(16), str(tmp_path),
                               max_images=2, num_frames=4, max_length=64)
    example = builder(0, record)
    assert example["pixel_values"].shape == (1, 4, 16, 16, 3)
    np.testing.assert_array_equal(example["item_mask"], [[True, True, True, False]])
    assert np.all(example["pixel_values"][0, 3] == 0)


# --------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_loss_mask_on_assistant_tokens():
    tok = D.ByteTokenizer()
    conv = _byte_conv("<image>\nHi <image>", "yes", "and?", "no")
    ids, mask = tok.encode_conversation(conv)
    expected = ([tok.bos_id, tok.role_ids["user"], tok.image_token_id, *b"\nHi ", tok.image_token_id, tok.end_id,
                 tok.role_ids["assistant"], *b"yes", tok.end_id, tok.role_ids["user"], *b"and?", tok.end_id,
                 tok.role_ids["assistant"], *b"no", tok.end_id])
    assert ids.tolist() == expected and ids.dtype == np.int32
    assert ids.tolist().count(tok.image_token_id) == 2
    targets = [i for i, m in zip(ids.tolist(), mask) if m]
    assert targets == [*b"yes", tok.end_id, *b"no", tok.end_id]
    assert tok.decode(tok.encode_prompt(conv[:1]), skip_special_tokens=False).endswith("<|end|><|assistant|>")


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["What colour is the circle? red", "How many shapes are there? two",
                              "user assistant system hello"] * 10, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = tmp_path_factory.mktemp("hf_tok")
    tok.save_pretrained(path)
    return str(path)


def test_hf_tokenizer_loss_mask_and_image_token(hf_tokenizer_dir):
    tok = D.HFTokenizer(hf_tokenizer_dir)
    assert tok.vocab_size == 301 and tok.image_token_id == 300  # <image> added as a special token
    conv = [{"from": "system", "value": "Be brief."}, *_byte_conv("<image>\nWhat colour? <image>", "red", "How many?",
                                                                    "two shapes")]
    ids, mask = tok.encode_conversation(conv)
    assert ids.tolist().count(tok.image_token_id) == 2
    rendered = tok.tokenizer.apply_chat_template(D.tokenizer.to_messages(conv), tokenize=False)
    assert tok.decode(ids, skip_special_tokens=False) == rendered
    runs, current = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == ["red<|im_end|>", "two shapes<|im_end|>"]
    assert runs[0] == tok.tokenizer.encode("red<|im_end|>", add_special_tokens=False)
    prompt = tok.decode(tok.encode_prompt(conv[:2]), skip_special_tokens=False)
    assert prompt.endswith("What colour? <image><|im_end|>\n<|im_start|>assistant\n")


def test_hf_tokenizer_needs_chat_template(hf_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    plain.chat_template = None
    plain.save_pretrained(tmp_path)
    for name in ("chat_template.jinja", "chat_template.json"):
        if (tmp_path / name).exists():
            (tmp_path / name).unlink()
    with pytest.raises(ValueError, match="chat_template"):
        D.HFTokenizer(str(tmp_path))


def test_image_tag_prepended_and_counted(tmp_path):
    _save_png(tmp_path / "a.png")
    builder = D.ExampleBuilder(D.ByteTokenizer(), D.ImageProcessor.siglip(8), str(tmp_path),
                               max_images=2, num_frames=2, max_length=64)
    example = builder(0, {"image": ["a.png", "a.png"], "conversations": _byte_conv("what?", "red")})
    tok = D.ByteTokenizer()
    assert tok.decode(example["input_ids"], False).startswith("<bos><|user|><image>\n<image>\nwhat?")
    np.testing.assert_array_equal(example["item_mask"], [[True, False], [True, False]])
    bad = builder(5, {"id": "x", "image": "a.png", "conversations": _byte_conv("<image><image>", "red")})
    assert isinstance(bad, D.BadRecord) and bad.id == "x" and "2 <image> tags for 1" in bad.reason


# --------------------------------------------------------------------------- batching


def test_collator_picks_smallest_bucket():
    def example(n):
        return {"input_ids": np.arange(n, dtype=np.int32), "loss_mask": np.ones(n, np.int32),
                "pixel_values": np.ones((1, 1, 4, 4, 3), np.float32), "item_mask": np.ones((1, 1), bool)}

    collate = D.Collator((16, 32, 64), max_images=2, num_frames=3, image_size=(4, 4), pad_id=7)
    batch = collate([example(5), example(20)])
    assert batch["input_ids"].shape == (2, 32) and batch["pixel_values"].shape == (2, 2, 3, 4, 4, 3)
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 27 and batch["input_ids"][0, 5] == 7
    assert batch["loss_mask"][0, 0] == 0 and batch["loss_mask"][0, 1:5].tolist() == [1] * 4
    assert batch["item_mask"][0].tolist() == [[True, False, False], [False, False, False]]
    assert collate([example(3)])["input_ids"].shape == (1, 16)
    fixed = D.Collator((16, 32, 64), 2, 3, (4, 4), 0, pad_to_max_bucket=True)
    assert fixed([example(3)])["input_ids"].shape == (1, 64)
    assert D.pad_batch(batch, 64)["loss_mask"].shape == (2, 64)


def test_train_batches_have_static_shapes(tmp_path):
    records = _records_dataset(tmp_path, 6)
    records[2]["conversations"] = _byte_conv("q2?" + "x" * 40, "a2")  # needs the 64 bucket
    config = _config(tmp_path, records, max_images=2, num_frames=3)
    it = D.make_train_iterator(config, batch_size=2, seed=0, process_index=0, process_count=1)
    lengths = set()
    for _ in range(9):
        batch = next(it)
        assert batch["pixel_values"].shape == (2, 2, 3, 16, 16, 3) and batch["item_mask"].shape == (2, 2, 3)
        assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == np.int32
        assert batch["loss_mask"].dtype == np.float32 and batch["item_mask"].dtype == bool
        assert batch["item_mask"][:, 0, 0].all() and not batch["item_mask"][:, 0, 1:].any()
        assert not batch["item_mask"][:, 1:].any() and not batch["pixel_values"][:, 1:].any()
        lengths.add(batch["input_ids"].shape[1])
    assert lengths == {32, 64}


# --------------------------------------------------------------------------- pipeline


def test_shuffle_is_seeded_and_covers_each_epoch(tmp_path):
    config = _config(tmp_path, _records_dataset(tmp_path, 8))

    def order(seed, batches=4):
        it = D.make_train_iterator(config, batch_size=4, seed=seed, process_index=0, process_count=1)
        return [q for _ in range(batches) for q in _question_ids(next(it))]

    first = order(3)
    assert first == order(3)
    assert first != order(4)
    assert sorted(first[:8]) == sorted(first[8:]) == list(range(8))  # each epoch sees every record once
    assert first[:8] != first[8:]  # and is reshuffled


def test_process_shards_are_disjoint(tmp_path):
    config = _config(tmp_path, _records_dataset(tmp_path, 9))
    seen = []
    for p in range(3):
        it = D.make_train_iterator(config, batch_size=3, seed=0, process_index=p, process_count=3,
                                   pad_to_max_bucket=False)
        seen.append(set(_question_ids(next(it))))
    assert seen == [{0, 3, 6}, {1, 4, 7}, {2, 5, 8}]
    multi = D.make_train_iterator(config, batch_size=3, seed=0, process_index=0, process_count=3)
    assert next(multi)["input_ids"].shape[1] == 64  # several processes: one T everywhere


def test_iterator_state_round_trip(tmp_path):
    records = _records_dataset(tmp_path, 7)
    records[4]["image"] = "img/missing.png"
    config = _config(tmp_path, records, max_bad_records=1)
    it = D.make_train_iterator(config, batch_size=2, seed=1, process_index=0, process_count=1)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    assert state["bad_records"]["bad_indices"] == [4]
    restored = D.make_train_iterator(config, batch_size=2, seed=1, process_index=0, process_count=1)
    restored.set_state(state)
    assert restored.bad_records.count == 1
    _check_batches(restored, expected)


def test_iterator_state_through_grain_orbax_handler(tmp_path):
    from etils import epath
    from grain.checkpoint import CheckpointHandler

    config = _config(tmp_path, _records_dataset(tmp_path, 5))
    it = D.make_train_iterator(config, batch_size=2, seed=2, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    (tmp_path / "ckpt").mkdir()
    CheckpointHandler().save(epath.Path(tmp_path / "ckpt"), it)
    expected = [next(it) for _ in range(3)]
    restored = D.make_train_iterator(config, batch_size=2, seed=2, process_index=0, process_count=1)
    CheckpointHandler().restore(epath.Path(tmp_path / "ckpt"), restored)
    _check_batches(restored, expected)



def test_bad_records_skipped_reported_and_budgeted(tmp_path):
    good = _records_dataset(tmp_path, 3)
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    _bomb_png(tmp_path / "img" / "bomb.png")
    _save_png(tmp_path / "img" / "big.png", size=(100, 100))
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42garbage" * 10)
    conv = _byte_conv("<image> q?", "a")
    bad = [
        {"id": "missing", "image": "img/nope.png", "conversations": conv},
        {"id": "escape", "image": "../outside.png", "conversations": conv},
        {"id": "absolute", "image": str(tmp_path / "img" / "0.png"), "conversations": conv},
        {"id": "corrupt", "image": "img/corrupt.png", "conversations": conv},
        {"id": "bomb", "image": "img/bomb.png", "conversations": conv},
        {"id": "big", "image": "img/big.png", "conversations": conv},
        {"id": "badvideo", "video": "corrupt.mp4", "conversations": conv},
        {"id": "empty", "image": "img/0.png", "conversations": []},
        {"id": "noanswer", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "toolong", "conversations": _byte_conv("x" * 100, "a")},
        {"id": "types", "image": 5, "conversations": conv},
        {"id": "nofield"},
        "not an object",
    ]
    records = good + bad
    config = _config(tmp_path, records, max_bad_records=len(bad), max_image_pixels=5000)
    it = D.make_train_iterator(config, batch_size=3, seed=0, process_index=0, process_count=1)
    assert sorted(q for _ in range(4) for q in _question_ids(next(it))) == sorted([0, 1, 2] * 4)
    reports = {r.id: r.reason for r in it.bad_records.reports}
    assert set(reports) == {b["id"] for b in bad[:-1]} | {f"#{len(records) - 1}"}
    assert "No such file" in reports["missing"] and "escapes" in reports["escape"]
    assert "absolute" in reports["absolute"] and "pixels" in reports["big"]
    assert "empty" in reports["empty"] and "no assistant" in reports["noanswer"]
    assert "largest bucket" in reports["toolong"] and "not an object" in reports[f"#{len(records) - 1}"]
    assert "Invalid data" in reports["badvideo"] and "decompression bomb" in reports["bomb"]
    assert it.bad_records.count == len(bad)  # later epochs do not count them again

    strict = D.make_train_iterator(_config(tmp_path, records, max_bad_records=2, max_image_pixels=5000),
                                   batch_size=3, seed=0, process_index=0, process_count=1)
    with pytest.raises(D.BadRecordBudgetExceeded, match=r"max_bad_records=2; last: id="):
        for _ in range(10):
            next(strict)


def test_jsonl_with_broken_line(tmp_path):
    records = _records_dataset(tmp_path, 2)
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(records[0]) + "\n{broken\n\n" + json.dumps(records[1]) + "\n")
    assert len(D.load_records(str(path))) == 3
    config = _config(tmp_path, [], train_json=str(path), max_bad_records=1)
    it = D.make_train_iterator(config, batch_size=2, seed=0, process_index=0, process_count=1)
    assert sorted(_question_ids(next(it)) + _question_ids(next(it))) == [0, 0, 1, 1]
    assert it.bad_records.reports[0].id == "#1" and "invalid JSON" in it.bad_records.reports[0].reason


def test_resolve_path_stays_in_root(tmp_path):
    assert D.resolve_path("/root", "a/./b.png") == "/root/a/b.png"
    for path in ("/etc/passwd", "../x.png", "a/../../x.png", "", "C:\\x.png", None):
        with pytest.raises(ValueError):
            D.resolve_path("/root", path)


def test_eval_iterator_lockstep_and_padding(tmp_path):
    records = _records_dataset(tmp_path, 10)
    records[7]["image"] = "img/missing.png"
    config = _config(tmp_path, records, max_bad_records=1)
    assert D.num_eval_batches(10, 2, 3) == 2
    valid = []
    for p in range(3):
        batches = list(D.make_eval_iterator(config, batch_size=2, process_index=p, process_count=3))
        assert len(batches) == 2
        for batch in batches:
            assert batch["input_ids"].shape == (2, 64)
            assert batch["valid"].dtype == bool and batch["index"].dtype == np.int32
            assert (batch["index"] >= 0).tolist() == batch["valid"].tolist()
            assert not batch["loss_mask"][~batch["valid"]].any()
            valid += batch["index"][batch["valid"]].tolist()
    assert sorted(valid) == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    single = list(D.make_eval_iterator(config, batch_size=4, process_index=0, process_count=1))
    assert [b["input_ids"].shape[1] for b in single] == [32, 32, 32]
    assert single[-1]["valid"].tolist() == [True, True, False, False]


# --------------------------------------------------------------------------- synthetic set


def _analyse(image, item):
    """Fill ratio of the shape's colour inside its box, and whether it lies in its half."""
    pixels = np.asarray(image)
    hits = np.all(pixels == synthetic.COLOURS[item["colour"]], axis=-1)
    ys, xs = np.nonzero(hits)
    x0, y0, x1, y1 = item["box"]
    assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    centre = xs.mean() < pixels.shape[1] / 2
    return hits.sum() / ((x1 - x0) * (y1 - y0)), "left" if centre else "right"


@pytest.mark.parametrize("grid,sentences,jitter", [(0, False, True), (4, True, True), (4, True, False)])
def test_synthetic_set_is_deterministic_and_correct(tmp_path, grid, sentences, jitter):
    kw = dict(num_train=90, num_eval=30, grid=grid, sentences=sentences, jitter=jitter)
    a = write_synthetic_vqa(str(tmp_path / "a"), seed=5, **kw)
    b = write_synthetic_vqa(str(tmp_path / "b"), seed=5, **kw)
    c = write_synthetic_vqa(str(tmp_path / "c"), seed=6, **kw)
    train = json.loads(open(a["train_json"]).read())
    assert train == json.loads(open(b["train_json"]).read()) != json.loads(open(c["train_json"]).read())
    png = "images/train-00007.png"
    assert (tmp_path / "a" / png).read_bytes() == (tmp_path / "b" / png).read_bytes()
    held_out = json.loads(open(a["eval_json"]).read())
    assert {r["image"] for r in held_out}.isdisjoint(r["image"] for r in train)
    fill = {"square": (0.95, 1.01), "circle": (0.7, 0.87), "triangle": (0.4, 0.62)}
    for record in train + held_out:
        image = Image.open(os.path.join(a["image_root"], record["image"])).convert("RGB")
        colours = {tuple(c) for c in np.asarray(image).reshape(-1, 3).tolist()} - {synthetic.BACKGROUND}
        assert colours == {synthetic.COLOURS[s["colour"]] for s in record["scene"]}
        observed = {}
        for item in record["scene"]:
            ratio, side = _analyse(image, item)
            low, high = fill[item["shape"]]
            assert low <= ratio <= high, (record["id"], item, ratio)
            assert side == item["side"]
            observed[item["shape"]] = (item["colour"], side)
        if grid:  # each shape inside its own cell; the cell's column gives the side
            cell = 64 // grid
            cells = [(x0 // cell, y0 // cell) for x0, y0, _, _ in (s["box"] for s in record["scene"])]
            assert all(x0 // cell == (x1 - 1) // cell and y0 // cell == (y1 - 1) // cell
                       for x0, y0, x1, y1 in (s["box"] for s in record["scene"])), record["id"]
            assert len(set(cells)) == len(cells)
            assert [("left", "right")[cx >= grid // 2] for cx, _ in cells] == [s["side"] for s in record["scene"]]
            if not jitter:  # 12 px shapes centred in 16 px cells
                assert all((x0 % cell, y0 % cell, x1 - x0, y1 - y0) == (2, 2, 12, 12)
                           for x0, y0, x1, y1 in (s["box"] for s in record["scene"])), record["id"]
        question = record["conversations"][0]["value"]
        answer = record["conversations"][1]["value"]
        assert answer == record["answer"] and question.startswith("<image>\n")
        words = answer.rstrip(".").split()
        if record["question_type"] == "count":
            assert (words[2] if sentences else answer) == synthetic.NUMBERS[len(colours) - 1]
        else:
            shape = next(s for s in synthetic.SHAPES if s in question)
            assert (words[-1] if sentences else answer) == observed[shape][0 if record["question_type"] == "colour" else 1]
            assert not sentences or words[:3] == ["The", shape, "is"]


@pytest.mark.parametrize("kinds", [synthetic.QUESTION_TYPES, synthetic.QUESTION_TYPES + ("shape",)])
def test_synthetic_multi_turn_training_records(tmp_path, kinds):
    paths = write_synthetic_vqa(str(tmp_path), num_train=30, num_eval=9, seed=1, train_turns=5, train_kinds=kinds)
    for record in json.loads(open(paths["train_json"]).read()):
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 5
        assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in turns[1:])
        by_shape = {s["shape"]: s for s in record["scene"]}
        by_colour = {s["colour"]: s for s in record["scene"]}
        asked = []
        for question, answer in zip(turns[::2], turns[1::2]):
            q, a = question["value"], answer["value"]
            if "How many" in q:
                asked.append("count")
                assert a == synthetic.NUMBERS[len(by_shape) - 1]
            elif "What shape" in q or "Which shape" in q:
                asked.append("shape")
                assert a == by_colour[next(c for c in synthetic.COLOURS if c in q)]["shape"]
            else:
                shape = by_shape[next(s for s in synthetic.SHAPES if s in q)]
                asked.append("colour" if "colour" in q else "side")
                assert a == shape[asked[-1]]
        assert sorted(asked[:len(kinds)]) == sorted(kinds)  # every kind before any repeats
        assert record["question_type"] == asked[-1] and record["answer"] == turns[-1]["value"]
    held_out = json.loads(open(paths["eval_json"]).read())
    assert all(len(r["conversations"]) == 2 and r["question_type"] in synthetic.QUESTION_TYPES for r in held_out)
    with pytest.raises(ValueError, match="train_turns"):
        write_synthetic_vqa(str(tmp_path / "x"), num_train=1, num_eval=1, train_turns=0)
    with pytest.raises(ValueError, match="train_kinds"):
        write_synthetic_vqa(str(tmp_path / "y"), num_train=1, num_eval=1, train_turns=2, train_kinds=("size",))


def test_synthetic_single_turn_kinds_and_captions(tmp_path):
    kinds = synthetic.QUESTION_TYPES + ("shape", "caption")
    paths = write_synthetic_vqa(str(tmp_path), num_train=20, num_eval=6, seed=2, train_kinds=kinds, grid=4)
    for i, record in enumerate(json.loads(open(paths["train_json"]).read())):
        assert len(record["conversations"]) == 2 and record["question_type"] == kinds[i % len(kinds)]
        if record["question_type"] == "caption":  # every shape once, left to right
            items = [part.split() for part in record["answer"].split(", ")]
            assert sorted(map(tuple, items)) == sorted((s["colour"], s["shape"], s["side"]) for s in record["scene"])
            x = [next(s["box"][0] for s in record["scene"] if s["shape"] == shape) for _, shape, _ in items]
            assert x == sorted(x)
    for bad in (3, 5, 16):
        with pytest.raises(ValueError, match="grid"):
            synthetic.make_scene(np.random.default_rng(0), 64, bad)


def test_synthetic_demo_mix_asks_side_twice_as_often_and_answers_from_the_image(tmp_path):
    """The demo's training mix (side listed twice): half the training questions ask a side, the held-out set
    asks the three kinds in turn, and every side answer is the half of the image where the named shape's
    colour is drawn."""
    import collections

    import lavi_jax

    kinds = lavi_jax.configs.get("configs/demo.py").demo.train_kinds
    paths = write_synthetic_vqa(str(tmp_path), num_train=40, num_eval=9, seed=3, train_kinds=tuple(kinds), grid=4,
                                sentences=True, jitter=False)
    train, held_out = (json.loads(open(paths[k]).read()) for k in ("train_json", "eval_json"))
    assert collections.Counter(r["question_type"] for r in train) == {"side": 20, "colour": 10, "count": 10}
    assert collections.Counter(r["question_type"] for r in held_out) == {"side": 3, "colour": 3, "count": 3}
    for r in train + held_out:
        if r["question_type"] == "side":
            image = Image.open(os.path.join(paths["image_root"], r["image"])).convert("RGB")
            item = next(s for s in r["scene"] if s["shape"] in r["conversations"][0]["value"])
            assert r["answer"] == f"The {item['shape']} is on the {_analyse(image, item)[1]}."


def test_synthetic_answers_are_balanced():
    rng = np.random.default_rng(0)
    answers = {kind: [] for kind in synthetic.QUESTION_TYPES}
    for _ in range(1500):
        scene = synthetic.make_scene(rng, 64)
        for kind in answers:
            answers[kind].append(synthetic.make_question(rng, scene, kind))
    chance = {"colour": 1 / 6, "count": 1 / 3, "side": 1 / 2}
    for kind, pairs in answers.items():
        by_question = {}
        for question, answer in pairs:
            by_question.setdefault(question, []).append(answer)
        for given in by_question.values():  # best text-only guess: the majority answer per question
            majority = max(given.count(a) for a in set(given)) / len(given)
            assert majority < chance[kind] + 0.08, (kind, majority)
