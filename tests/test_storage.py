from lavi_jax import storage
def test_basic(bucket, tmp_path):
    for base in (bucket, str(tmp_path)):
        p = storage.join(base, "a", "b.json")
        storage.write_json(p, {"x": 1})
        assert storage.read_json(p) == {"x": 1}
        assert storage.read_bytes(p, 1, 4) == b'"x"'
        assert storage.listdir(storage.join(base, "a")) == ["b.json"]
        assert storage.isdir(storage.join(base, "a")) and storage.isfile(p)
        assert storage.glob(storage.join(base, "a", "*.json")) == [p]
        storage.check_writable(storage.join(base, "run"))
        storage.remove(p); assert not storage.exists(p)
