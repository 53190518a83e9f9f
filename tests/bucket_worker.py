"""Trains the small test config on LLaVA data at DATA into WORKDIR (both may be gs:// URIs), resuming when possible.

    python tests/bucket_worker.py DATA WORKDIR NUM_STEPS [NUM_PROCESSES PROCESS_ID PORT] [--evals]

With NUM_PROCESSES > 1 the processes meet at 127.0.0.1:PORT. ``--evals`` adds the
end-of-run exact-match eval and the ``llava_json`` task (results under
WORKDIR/results). Used by test_storage_train.py (multi-host on a bucket, faults,
kills); the storage clients find the server through STORAGE_EMULATOR_HOST /
TENSORSTORE_GCS_HTTP_URL.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lavi_jax import distributed, storage  # noqa: E402
from tests.small import small_config  # noqa: E402


def config_for(data: str, num_steps: int, evals: bool = False):
    vqa = {"train_json": storage.join(data, "train.json"), "eval_json": storage.join(data, "eval.json"),
           "image_root": data}
    config = small_config(vqa, num_steps=num_steps, checkpoint_every=2, keep_checkpoints=3)
    config.evals.exact_match = evals
    if evals:
        config.evals.tasks = "llava_json"
        config.evals.llava_json.limit = 8
    return config


if __name__ == "__main__":
    os.environ.setdefault("LAVI_NO_PROGRESS", "1")
    args = [a for a in sys.argv[1:] if a != "--evals"]
    data, workdir, steps = args[0], args[1], int(args[2])
    if len(args) > 3 and int(args[3]) > 1:
        distributed.initialize(f"127.0.0.1:{args[5]}", int(args[3]), int(args[4]))
    from lavi_jax.train import train

    train(config_for(data, steps, "--evals" in sys.argv), workdir)
