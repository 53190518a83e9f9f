"""The CPU demo: LaVi vs a text-only model on a synthetic VQA set, trained from scratch side by side.

    python demo.py --workdir /tmp/lavi_demo
    python demo.py --workdir /tmp/lavi_demo_quick --config configs/demo.py:quick

Writes the data under ``<workdir>/data``, trains one model per
``config.demo.fusions`` in ``<workdir>/<fusion>`` (rerunning resumes) and prints
their held-out exact match per question type next to the majority-answer rate.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from lavi_jax import distributed
from lavi_jax.demo import run

flags.DEFINE_string("workdir", None, "Where the data, checkpoints and results go.", required=True)
distributed.define_flags()
config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.py"),
                                "Config file, path[:arg].", lock_config=True)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    distributed.start_from_flags()
    run.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
