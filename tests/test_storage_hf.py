"""HF checkpoints behind URIs and Hub ids: ranged safetensors reads, import from a ``gs://`` bucket (on the
emulator), export to one and back, and ``org/name`` ids answered from a Hub cache built here (nothing downloads)."""

import os
import shutil

import numpy as np
import pytest
from flax import traverse_util

from conversions import check_logits
from conversions import export_hf as export_cli
from conversions import import_hf as import_cli
from lavi_jax import checkpoint, storage
from lavi_jax import config as C
from lavi_jax.hf import ConversionError, exporter, hub, importer, safetensors_io
from lavi_jax.hf.safetensors_io import SafetensorsReader, write_safetensors
from tests import hf_models


def assert_trees_equal(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def upload(local: str, uri: str) -> str:
    storage.copy_tree(local, uri)
    return uri


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Qwen2 (with tokenizer files) and SigLIP tower on local disk, built once."""
    root = tmp_path_factory.mktemp("hf")
    llm, _ = hf_models.qwen2(root / "llm", kv_heads=2)
    hf_models.tokenizer(root / "llm")
    vision, _ = hf_models.siglip(root / "vision", layers=2)
    return llm, vision


BASE = C.model(conditioner=C.conditioner(width=32, num_heads=4))


# ----------------------------------------------------------------------------- safetensors, ranged


@pytest.mark.parametrize("where", ["local", "gs"])
def test_safetensors_ranged_reads(where, tmp_path, request, monkeypatch):
    """Written as shards with an index (to disk or a bucket) and read back tensor by tensor, each with one ranged
    read of its own bytes only (row chunks when large); never the whole file."""
    base = request.getfixturevalue("bucket") if where == "gs" else str(tmp_path)
    directory = storage.join(base, "ckpt")
    rng = np.random.default_rng(0)
    want = {"a": rng.standard_normal((40, 8)).astype(np.float32), "b": np.arange(6, dtype=np.int64).reshape(2, 3),
            "c": rng.standard_normal((3, 5)).astype(safetensors_io.np_dtype("bfloat16")),
            "scalar": np.float32(2.5).reshape(()), "empty": np.zeros((0, 4), np.float16)}
    names = write_safetensors(directory, [(n, x.shape, x.dtype, lambda x=x: x) for n, x in want.items()],
                              max_shard_bytes=1000)
    assert len(names) == 2 and storage.isfile(storage.join(directory, safetensors_io.INDEX))
    calls = []
    real = storage.read_bytes

    def spy(path, start=None, end=None):
        calls.append((path, start, end))
        return real(path, start, end)

    monkeypatch.setattr(storage, "read_bytes", spy)
    monkeypatch.setattr(safetensors_io, "READ_CHUNK_BYTES", 400)  # "a" (1280 bytes) is read in row chunks
    reader = SafetensorsReader(directory)
    assert reader.names() == sorted(want)
    for n, x in want.items():
        got = reader.get(n)
        assert got.dtype == x.dtype and got.shape == x.shape and got.tobytes() == x.tobytes(), n
    np.testing.assert_array_equal(reader.read_rows("a", 5, 9), want["a"][5:9])
    ranged = [c for c in calls if not c[0].endswith(".json")]
    assert ranged and all(s is not None and e is not None and e - s <= 1280 for _, s, e in ranged), ranged
    assert sum(1 for _, s, e in ranged if e - s <= 400 and s > 8) >= 4  # "a" came in chunks of at most 400 bytes


def test_safetensors_errors_name_file_and_tensor(bucket, tmp_path):
    file = storage.join(bucket, "m.safetensors")
    x = np.ones((4, 4), np.float32)
    write_safetensors(str(tmp_path), [("w", x.shape, x.dtype, lambda: x)])
    data = open(tmp_path / "model.safetensors", "rb").read()
    storage.write_bytes(file, data[:-8])  # truncated: the header says 64 bytes of data, 56 are there
    with pytest.raises(ConversionError, match=f"{file}: tensor 'w': data_offsets"):
        SafetensorsReader(file)
    storage.write_bytes(file, b"\xff" * 16)
    with pytest.raises(ConversionError, match=f"{file}: unreadable safetensors data"):
        SafetensorsReader(file)
    with pytest.raises(FileNotFoundError, match=f"no model.safetensors .* in {bucket}/nothing"):
        SafetensorsReader(storage.join(bucket, "nothing"))


# ----------------------------------------------------------------------------- import from a bucket


def test_import_from_bucket_equals_local(models, bucket, tmp_path, capsys):
    """LLM + vision tower from gs:// give the params the local directories give; the CLI copies the tokenizer."""
    llm, vision = models
    gllm, gvis = upload(llm, f"{bucket}/llm"), upload(vision, f"{bucket}/vision")
    cfg, local = importer.import_hf(llm, vision, BASE)
    gcfg, remote = importer.import_hf(gllm, gvis, BASE)
    assert gcfg.to_dict() == cfg.to_dict()
    assert_trees_equal(local, remote)

    out = str(tmp_path / "ckpt")
    assert import_cli.main(["--llm", gllm, "--vision", gvis, "--out", out]) == 0, capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(out, "tokenizer"))) == sorted(
        f for f in os.listdir(llm) if f in importer.TOKENIZER_FILES)
    assert checkpoint.read_config(out).data.tokenizer == os.path.join(out, "tokenizer")
    _, params = checkpoint.load(out)
    flat = traverse_util.flatten_dict(params)
    for k, v in traverse_util.flatten_dict(local).items():
        if k[0] in ("llm", "vision") and "conditioner" not in k:  # the CLI's default conditioner is not BASE's
            np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v), err_msg="/".join(k))


def _cli_error(capsys, argv) -> str:
    capsys.readouterr()
    assert import_cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("import_hf: error: ") and "\n" not in err, err
    return err


def test_bucket_errors_name_the_uri(models, bucket, tmp_path, capsys):
    llm, _ = models
    out = str(tmp_path / "ckpt")
    broken = tmp_path / "broken"
    shutil.copytree(llm, broken)
    t = SafetensorsReader(str(broken))
    kept = {n: t.get(n) for n in t.names() if n != "model.layers.1.mlp.up_proj.weight"}
    os.remove(broken / "model.safetensors")
    write_safetensors(str(broken), [(n, x.shape, x.dtype, lambda x=x: x) for n, x in kept.items()])
    uri = upload(str(broken), f"{bucket}/broken")
    err = _cli_error(capsys, ["--llm", uri, "--out", out])
    assert f"missing tensor 'model.layers.1.mlp.up_proj.weight' in {uri}" in err, err

    uri = upload(llm, f"{bucket}/noconfig")
    storage.remove(f"{uri}/config.json")
    assert f"no config.json in {uri}" in _cli_error(capsys, ["--llm", uri, "--out", out])

    uri = "gs://no-such-bucket-lavi-test/llm"
    assert uri in _cli_error(capsys, ["--llm", uri, "--out", out])
    assert "gs://no-such-bucket-lavi-test/ckpt" in _cli_error(
        capsys, ["--llm", llm, "--out", "gs://no-such-bucket-lavi-test/ckpt"])


def test_export_to_bucket_and_back(models, bucket, tmp_path, capsys):
    """A checkpoint exported to gs:// (CLI) imports back (--lavi gs://...) to the same params."""
    llm, vision = models
    ckpt = str(tmp_path / "ckpt")
    assert import_cli.main(["--llm", llm, "--vision", vision, "--out", ckpt]) == 0, capsys.readouterr().err
    out = f"{bucket}/export"
    assert export_cli.main(["--ckpt", ckpt, "--out", out]) == 0, capsys.readouterr().err
    assert storage.listdir(out) == ["lavi", "llm", "vision"]
    assert "tokenizer.json" in storage.listdir(f"{out}/llm")
    _, params = checkpoint.load(ckpt)
    cfg, back = importer.import_hf(lavi_dir=out)
    assert_trees_equal(params, back)
    again = str(tmp_path / "again")
    assert import_cli.main(["--lavi", out, "--out", again]) == 0, capsys.readouterr().err
    assert os.path.isfile(os.path.join(again, "tokenizer", "tokenizer.json"))
    capsys.readouterr()
    assert check_logits.main(["--ckpt", ckpt, "--hf", out]) == 0  # PyTorch's side reads a local copy of the export
    assert "OK" in capsys.readouterr().out
    assert export_cli.main(["--ckpt", ckpt, "--out", out]) == 1  # not empty: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Hub ids


def hub_cache(root, repo: str, files_from: str, commit: str = "0123456789abcdef0123456789abcdef01234567") -> str:
    """A Hugging Face Hub cache holding ``repo`` at ``commit`` (refs/main -> commit), as huggingface_hub writes it."""
    folder = os.path.join(root, "models--" + repo.replace("/", "--"))
    shutil.copytree(files_from, os.path.join(folder, "snapshots", commit))
    os.makedirs(os.path.join(folder, "refs"))
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(commit)
    return commit


def test_hub_id_from_the_cache(models, tmp_path, monkeypatch, capsys):
    llm, _ = models
    cache = str(tmp_path / "hub")
    commit = hub_cache(cache, "tiny-org/tiny-qwen2", llm)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # "tiny-org/tiny-qwen2" is no local path here
    assert hub.resolve("tiny-org/tiny-qwen2").endswith(os.path.join("snapshots", commit))
    assert hub.resolve(f"tiny-org/tiny-qwen2@{commit}") == hub.resolve("tiny-org/tiny-qwen2")
    assert hub.resolve(llm) == llm
    _, local = importer.import_hf(llm)
    _, by_id = importer.import_hf("tiny-org/tiny-qwen2")
    assert_trees_equal(local, by_id)
    out = str(tmp_path / "ckpt")
    assert import_cli.main(["--llm", "tiny-org/tiny-qwen2", "--out", out]) == 0, capsys.readouterr().err
    assert os.path.isfile(os.path.join(out, "tokenizer", "tokenizer.json"))

    err = _cli_error(capsys, ["--llm", "tiny-org/not-cached", "--out", str(tmp_path / "other")])
    assert "tiny-org/not-cached" in err and cache in err and "HF_HUB_OFFLINE" in err, err
    with pytest.raises(FileNotFoundError, match="tiny-org/tiny-qwen2@v9 is not in the cache"):
        hub.resolve("tiny-org/tiny-qwen2@v9")
