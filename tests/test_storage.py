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


def test_params_saved_to_a_bucket_load_back_exactly(bucket):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import lavi_jax
    from lavi_jax import checkpoint, sharding
    from tests.small import small_config

    config = small_config({"train_json": "", "eval_json": "", "image_root": ""})
    model = lavi_jax.LaVi(config.model)
    params = sharding.init_params(model, jax.random.key(3), jnp.zeros((1, 8), jnp.int32))
    uri = storage.join(bucket, "ckpt")
    assert checkpoint.save_params(uri, config, params) == uri  # a URI stays a URI
    assert checkpoint.resolve(storage.join(uri, "0")) == uri and checkpoint.resolve(uri) == uri
    loaded_model, loaded = lavi_jax.load(uri)
    assert loaded_model.config.to_dict() == config.model.to_dict()
    for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(jax.device_get(loaded)), strict=True):
        np.testing.assert_array_equal(a, b)
