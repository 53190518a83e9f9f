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
