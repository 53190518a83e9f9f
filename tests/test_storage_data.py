"""The data layer and the benchmark scorers reading from a bucket (the GCS emulator) give what they give from local disk."""

import json
import os

import av
import numpy as np
import pytest
from PIL import Image

from lavi_jax import config as C
from lavi_jax import data as D
from lavi_jax import storage
from lavi_jax.data.bad_records import BadRecord
from lavi_jax.data.media import inside_root
from lavi_jax.eval import scorers
from tests.test_data import _write_mp4


def _upload(local_root, uri_root):
    """Copies every file under ``local_root`` to ``uri_root`` (same relative paths)."""
    for folder, _, names in os.walk(local_root):
        for name in names:
            local = os.path.join(folder, name)
            rel = os.path.relpath(local, local_root).replace(os.sep, "/")
            with open(local, "rb") as f:
                storage.write_bytes(storage.join(uri_root, rel), f.read())


def _conv(question, answer):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]




def _llava_dataset(root):
    """A LLaVA json with 6 image records (PNG and JPEG), a video file, a frame folder, a missing image and an
    escaping path; returns the records."""
    os.makedirs(os.path.join(root, "img"))
    os.makedirs(os.path.join(root, "frames"))
    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        pixels = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
        name = f"img/{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(os.path.join(root, name))
        records.append({"id": f"r{i}", "image": name, "conversations": _conv(f"<image> q{i}?", f"a{i}")})
    _write_mp4(os.path.join(root, "clip.mp4"), num_frames=9, size=(32, 24))
    for i in range(5):
        Image.new("RGB", (16, 12), (i * 40, 10, 200)).save(os.path.join(root, "frames", f"frame_{i + 1}.png"))
    records += [
        {"id": "video", "video": "clip.mp4", "conversations": _conv("<video> what?", "grey")},
        {"id": "folder", "video": "frames", "conversations": _conv("<video> colour?", "blue")},
        {"id": "missing", "image": "img/nope.png", "conversations": _conv("<image> q?", "a")},
        {"id": "escape", "image": "../outside.png", "conversations": _conv("<image> q?", "a")},
    ]
    with open(os.path.join(root, "train.json"), "w") as f:
        json.dump(records, f)
    Image.new("RGB", (8, 8)).save(os.path.join(os.path.dirname(root), "outside.png"))  # what "escape" points at
    return records


def _config(root, **overrides):
    kw = dict(train_json=storage.join(root, "train.json"), eval_json=storage.join(root, "train.json"), image_root=root,
              image_size=16, seq_buckets=(32, 64), num_threads=2, max_bad_records=2, max_images=1, num_frames=3)
    kw.update(overrides)
    return C.data(**kw)


def test_train_batches_from_a_bucket_equal_local_ones(bucket, tmp_path):
    local = str(tmp_path / "data")
    _llava_dataset(local)
    remote = storage.join(bucket, "llava")
    _upload(local, remote)
    storage.write_bytes(storage.join(bucket, "outside.png"), open(tmp_path / "outside.png", "rb").read())

    batches, reports = {}, {}
    for name, root in (("local", local), ("gs", remote)):
        it = D.make_train_iterator(_config(root), batch_size=4, seed=1, process_index=0, process_count=1)
        batches[name] = [next(it) for _ in range(6)]  # 8 good records: 3 epochs
        reports[name] = {r.id: r.reason for r in it.bad_records.reports}
    for want, got in zip(batches["local"], batches["gs"]):
        assert set(want) == set(got)
        for key in want:
            assert np.array_equal(want[key], got[key]), key
    # The video file and the frame folder both gave 3 frames.
    masks = np.concatenate([b["item_mask"] for b in batches["gs"]])
    assert (masks.sum(axis=(1, 2)) == 3).sum() >= 2 * 3
    # The same bad records, named by id, for the same reasons.
    assert set(reports["gs"]) == set(reports["local"]) == {"missing", "escape"}
    assert "No such file" in reports["gs"]["missing"] and "img/nope.png" in reports["gs"]["missing"]
    assert "escapes" in reports["gs"]["escape"]


def test_example_builder_on_a_bucket(bucket, tmp_path):
    local = str(tmp_path / "data")
    records = _llava_dataset(local)
    remote = storage.join(bucket, "llava")
    _upload(local, remote)
    tok, proc = D.make_tokenizer("byte"), D.make_image_processor("siglip", 16)
    built = {}
    for name, root in (("local", local), ("gs", remote)):
        builder = D.ExampleBuilder(tok, proc, root, max_images=1, num_frames=3, max_length=64)
        built[name] = [builder(i, r) for i, r in enumerate(D.load_records(storage.join(root, "train.json")))]
    for r, want, got in zip(records, built["local"], built["gs"]):
        if r["id"] in ("missing", "escape"):
            assert isinstance(got, BadRecord) and got.id == r["id"], got
            continue
        for key in want:
            assert np.array_equal(want[key], got[key]), (r["id"], key)
    assert built["gs"][7]["item_mask"][0].sum() == 3  # the frame folder


def test_paths_stay_inside_a_bucket_root():
    root = "gs://b/images"
    assert inside_root(root, "gs://b/images/x/1.png") == "gs://b/images/x/1.png"
    assert inside_root(root + "/", "gs://b/images/./x/../2.png") == "gs://b/images/2.png"
    for outside in ("gs://b/images/../x.png", "gs://b/other/x.png", "gs://c/images/x.png", "gs://b/images2/x.png",
                    "s3://b/images/x.png", "/b/images/x.png", "images/x.png"):
        with pytest.raises(ValueError, match="outside the image root"):
            inside_root(root, outside)
    with pytest.raises(ValueError, match="escapes"):
        D.records.resolve_path(root, "../x.png")
    with pytest.raises(ValueError, match="absolute"):
        D.records.resolve_path(root, "/x.png")
    assert D.records.resolve_path(root, "a/./b.png") == "gs://b/images/a/b.png"
    loader = D.MediaLoader(D.make_image_processor("siglip", 8), image_root=root, joined=True)
    with pytest.raises(ValueError, match="outside the image root"):
        loader.resolve([("image", "gs://b/images/../secret.png")])


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _benchmarks(root):
    """POPE questions + label folder, an MME release folder (both layouts), a VQA questions file."""
    questions = []
    for cat in ("random", "adversarial"):
        rows = [{"question_id": i + 1, "image": f"COCO_{i}.jpg", "text": f"Is there a {o}?", "label": lab}
                for i, (o, lab) in enumerate([("dog", "yes"), ("cat", "no"), ("cup", "no")])]
        _write_jsonl(os.path.join(root, "pope", f"coco_pope_{cat}.json"), rows)
        questions += [{"question_id": len(questions) + i + 1, "image": r["image"], "text": r["text"], "category": cat}
                      for i, r in enumerate(rows)]
    _write_jsonl(os.path.join(root, "llava_pope_test.jsonl"), questions)
    mme = os.path.join(root, "MME")
    for task, nested in (("existence", False), ("artwork", True)):
        img_dir = os.path.join(mme, task, "images") if nested else os.path.join(mme, task)
        qa_dir = os.path.join(mme, task, "questions_answers_YN") if nested else os.path.join(mme, task)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(qa_dir, exist_ok=True)
        for stem in ("1", "2"):
            Image.new("RGB", (4, 4)).save(os.path.join(img_dir, f"{stem}.jpg"))
            with open(os.path.join(qa_dir, f"{stem}.txt"), "w", newline="") as f:
                f.write(f"Is it {task} {stem}? Please answer yes or no.\tYes\r\nIs it not? Please answer yes or no.\tNo\n")
    _write_jsonl(os.path.join(root, "vqa.jsonl"), [{"question_id": 1, "image": "a.jpg", "text": "What?", "answer": "x"}])


def test_benchmark_files_from_a_bucket_equal_local_ones(bucket, tmp_path):
    local = str(tmp_path / "bench")
    _benchmarks(local)
    remote = storage.join(bucket, "bench")
    _upload(local, remote)

    def load(root):
        j = lambda *p: storage.join(root, *p)  # noqa: E731
        return {
            "pope": scorers.get("pope").load(j("llava_pope_test.jsonl"), j("pope"), image_root=j("coco")),
            "pope_labels": scorers.get("pope").load(j("pope")),
            "mme": scorers.get("mme").load(annotations=j("MME")),
            "mme_dir": scorers.get("mme").load(j("MME")),
            "vqa": scorers.get("vqav2").load(j("vqa.jsonl"), image_root=j("coco")),
        }

    here, there = load(local), load(remote)

    def relative(samples, root):  # image paths differ only by their root
        return json.loads(json.dumps(samples).replace(root, "<root>"))

    for key in here:
        assert here[key], key
        assert relative(here[key], local) == relative(there[key], remote), key
    assert there["pope"][0]["image"] == f"{remote}/coco/COCO_0.jpg"
    assert [s["answer"] for s in there["pope"]] == ["yes", "no", "no"] * 2
    assert there["mme"][0]["image"] == f"{remote}/MME/artwork/images/1.jpg"
    assert [s["answer"] for s in there["mme"]] == ["yes", "no"] * 4
    assert storage.isfile(there["mme"][0]["image"])


def test_processor_config_and_tokenizer_json_from_a_bucket(bucket):
    from lavi_jax.data.tokenizer import image_token_id_in

    d = storage.join(bucket, "hf")
    config = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 30}, "crop_size": 28}
    storage.write_json(storage.join(d, "preprocessor_config.json"), config)
    assert D.make_image_processor(d, 0) == D.ImageProcessor.from_hf_config(config)
    assert D.ImageProcessor.from_hf_dir(storage.join(d, "preprocessor_config.json")).output_size == (28, 28)
    assert image_token_id_in(d) is None  # no tokenizer.json yet
    storage.write_json(storage.join(d, "tokenizer.json"), {"added_tokens": [{"content": "<s>", "id": 0}],
                                                           "model": {"vocab": {"a": 1, "b": 2}}})
    assert image_token_id_in(d) == 3
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        D.tokenizer.HFTokenizer(storage.join(bucket, "none"))
