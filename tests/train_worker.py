"""Trains the small test config in WORKDIR on the set in DATA_DIR (resuming when possible).

    python tests/train_worker.py DATA_DIR WORKDIR NUM_STEPS

Used by test_faults.py, which kills it at random points.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lavi_jax.train import train  # noqa: E402
from tests.small import small_config  # noqa: E402


def config_for(data_dir: str, num_steps: int):
    vqa = {"train_json": os.path.join(data_dir, "train.json"), "eval_json": os.path.join(data_dir, "eval.json"),
           "image_root": data_dir}
    config = small_config(vqa, num_steps=num_steps, checkpoint_every=2, keep_checkpoints=2)
    config.evals.exact_match = False
    return config


if __name__ == "__main__":
    os.environ.setdefault("LAVI_NO_PROGRESS", "1")
    data_dir, workdir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    train(config_for(data_dir, steps), workdir)
