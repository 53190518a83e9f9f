import os

# Tests run on CPU with 8 host devices so sharded paths are exercised on one machine.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
from PIL import ImageFile


@pytest.fixture(autouse=True)
def pil_rejects_truncated_images():
    """Importing lmms-eval's task module (a scorer reference) sets PIL's process-wide
    LOAD_TRUNCATED_IMAGES; every test starts from PIL's default, under which truncated files fail."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    yield


@pytest.fixture(scope="session")
def gcs():
    """A GCS-compatible server on 127.0.0.1 for the session (benchmarks.gcs.Emulator), with gcsfs, google-cloud-storage
    and tensorstore pointed at it through STORAGE_EMULATOR_HOST / TENSORSTORE_GCS_HTTP_URL (subprocesses inherit
    them); stopped, and the variables restored, at the end."""
    from benchmarks.gcs import serving

    with serving() as server:
        yield server


@pytest.fixture
def bucket(gcs, request):
    """A fresh bucket on the session's server -> its ``gs://`` URI."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:6]
    gcs.create_bucket(name)
    return f"gs://{name}"
