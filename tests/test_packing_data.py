"""Packed training batches (``config.data.packing``): contents against the unpacked examples, budgets, resume, shards."""

import json
import os

import numpy as np
from PIL import Image

from lavi_jax import config as C
from lavi_jax import data as D
from lavi_jax.data import pipeline

T, ITEMS, FRAMES = 96, 3, 2


def _records(tmp_path, n, bad=()):
    """n records of varied lengths with 0-2 images each (unique text), plus ``bad`` ones."""
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "img", exist_ok=True)
    records = []
    for i in range(n):
        images = []
        for j in range(i % 3):
            Image.new("RGB", (12, 10), (i * 9 % 256, j * 80, 40)).save(tmp_path / "img" / f"{i}_{j}.png")
            images.append(f"img/{i}_{j}.png")
        question = f"q{i}?" + "x" * int(rng.integers(0, 40))
        answer = f"a{i}" + "y" * int(rng.integers(0, 20))
        record = {"id": f"r{i}", "conversations": [{"from": "human", "value": question},
                                                   {"from": "gpt", "value": answer}]}
        if images:
            record["image"] = images
        records.append(record)
    return records + list(bad)


def _config(tmp_path, records, **overrides):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    c = dict(train_json=str(path), image_root=str(tmp_path), image_size=16, seq_buckets=(48, T), num_threads=2,
             max_bad_records=0, max_images=ITEMS, num_frames=FRAMES, packing=True, pack_window=3)
    c.update(overrides)
    return C.data(**c)


def _reference(config, records):
    """ExampleBuilder output of every good record, by index."""
    tok, proc = pipeline._components(config, None, None)
    builder = pipeline._builder(config, tok, proc)
    out = {i: builder(i, r) for i, r in enumerate(records)}
    return {i: e for i, e in out.items() if not isinstance(e, D.BadRecord)}


def _stream(config, refs, n, **kw):
    """Record indices of the first n examples of the unpacked pipeline (same seed and shard)."""
    it = D.make_train_iterator(_unpacked(config), batch_size=1, **kw)
    by_tokens = {tuple(e["input_ids"]): i for i, e in refs.items()}
    out = []
    for _ in range(n):
        b = next(it)
        out.append(by_tokens[tuple(b["input_ids"][0][b["attention_mask"][0] == 1])])
    return out


def _unpacked(config):
    c = C.data(**config.to_dict())
    c.packing = False
    return c


def _check_row(batch, b, refs):
    """Row b holds its records' tokens, loss masks and items exactly, in order; returns the record indices."""
    seg, pos = batch["segment_ids"][b], batch["positions"][b]
    n_seg = int(seg.max())
    t = k = 0
    indices = []
    for s in range(1, n_seg + 1):
        index = int(batch["record_index"][b, t])
        e = refs[index]
        n, items = len(e["input_ids"]), e["item_mask"].shape[0]
        assert (seg[t:t + n] == s).all() and (batch["record_index"][b, t:t + n] == index).all()
        np.testing.assert_array_equal(batch["input_ids"][b, t:t + n], e["input_ids"])
        np.testing.assert_array_equal(pos[t:t + n], np.arange(n))
        assert batch["loss_mask"][b, t] == 0
        np.testing.assert_array_equal(batch["loss_mask"][b, t + 1:t + n], e["loss_mask"][1:])
        assert (batch["attention_mask"][b, t:t + n] == 1).all()
        np.testing.assert_array_equal(batch["pixel_values"][b, k:k + items], e["pixel_values"])
        np.testing.assert_array_equal(batch["item_mask"][b, k:k + items], e["item_mask"])
        indices.append(index)
        t, k = t + n, k + items
    assert t <= T and k <= ITEMS  # the budgets
    assert (seg[t:] == 0).all() and (pos[t:] == 0).all() and (batch["attention_mask"][b, t:] == 0).all()
    assert (batch["input_ids"][b, t:] == D.ByteTokenizer().pad_id).all() and not batch["loss_mask"][b, t:].any()
    assert not batch["item_mask"][b, k:].any() and not batch["pixel_values"][b, k:].any()
    return indices


def test_packed_rows_are_the_unpacked_examples(tmp_path):
    records = _records(tmp_path, 13)
    config = _config(tmp_path, records)
    refs = _reference(config, records)
    it = D.make_train_iterator(config, batch_size=2, seed=5, process_index=0, process_count=1)
    spec = D.BatchSpec.from_config(_run_config(config), 2)
    emitted = []
    for _ in range(12):
        batch = next(it)
        for key, (shape, dtype) in spec.shapes().items():
            assert batch[key].shape == shape and batch[key].dtype == dtype, key
        for b in range(2):
            emitted += _check_row(batch, b, refs)
    state = it.get_state()["pipeline"]
    pending = [i for row in state["open"] + state["ready"] for i in row]
    stream = _stream(config, refs, len(emitted) + len(pending), seed=5, process_index=0, process_count=1)
    assert sorted(emitted + pending) == sorted(stream)  # each record once per epoch, nothing lost or repeated
    assert len(stream) > 2 * len(records)
    assert len(emitted) / 24 > 1.5  # several records per row


def _run_config(data_config):
    c = C.experiment(C.model())
    c.data = data_config
    return c


def test_batch_spec_packed_fields():
    c = _run_config(C.data(packing=True))
    assert {"segment_ids", "positions"} <= set(D.BatchSpec.from_config(c, 2).keys())
    assert "segment_ids" not in D.BatchSpec.from_config(c, 2, packed=False).keys()
    assert "segment_ids" not in D.BatchSpec.from_config(_run_config(C.data()), 2).keys()


def test_packed_resume_mid_epoch(tmp_path):
    records = _records(tmp_path, 11, bad=[{"id": "missing", "image": "img/none.png",
                                           "conversations": [{"from": "human", "value": "q"},
                                                             {"from": "gpt", "value": "a"}]}])
    config = _config(tmp_path, records, max_bad_records=1)
    it = D.make_train_iterator(config, batch_size=2, seed=1, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["pipeline"]["open"]  # rows were open at the save
    expected = [next(it) for _ in range(6)]
    restored = D.make_train_iterator(config, batch_size=2, seed=1, process_index=0, process_count=1)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert restored.bad_records.count == 1 and it.bad_records.reports[0].id == "missing"
    seen = {i for b in expected for i in b["record_index"].ravel() if i >= 0}
    assert len(records) - 1 not in seen


def test_packed_process_shards_are_disjoint(tmp_path):
    records = _records(tmp_path, 12)
    config = _config(tmp_path, records)
    seen = []
    for p in range(2):
        it = D.make_train_iterator(config, batch_size=2, seed=0, process_index=p, process_count=2)
        seen.append({int(i) for _ in range(4) for i in next(it)["record_index"].ravel() if i >= 0})
    assert seen[0] == set(range(0, 12, 2)) and seen[1] == set(range(1, 12, 2))


def test_row_item_budget_is_pack_max_images_while_max_images_stays_per_sample(tmp_path):
    records = _records(tmp_path, 12)  # record i has i % 3 images
    config = _config(tmp_path, records, max_images=1, pack_max_images=4, max_bad_records=12)
    it = D.make_train_iterator(config, batch_size=2, seed=0, process_index=0, process_count=1)
    batches = [next(it) for _ in range(4)]
    assert all(b["item_mask"].shape[1] == 4 for b in batches)
    assert max(int(b["item_mask"].any(-1).sum(1).max()) for b in batches) >= 2  # rows hold several images
    # a record with two images exceeds max_images=1 per sample: skipped and reported by id
    assert {r.id for r in it.bad_records.reports} == {f"r{i}" for i in range(12) if i % 3 == 2}
    run = _run_config(config)
    assert D.BatchSpec.from_config(run, 2).max_items == 4
    assert D.BatchSpec.from_config(run, 2, packed=False).max_items == 1  # evaluation batches: per sample
