"""Train LaVi on LLaVA-format data.

    python train.py --config configs/lavi_qwen2_7b_siglip.py --workdir /ckpt/run1 \\
        --config.data.train_json=data/llava.json --config.data.image_root=data/images --config.train.num_steps=5000
    python train.py --config configs/lavi_qwen2_7b_siglip.py --workdir /tmp/dry --config.dry_run=True

Run the same command on every host of a pod; pass --coordinator_address,
--num_processes and --process_id where JAX cannot detect them (CPU, bare GPU
clusters). ``--config.dry_run=True`` compiles the step and prints its memory
and FLOPs per device without allocating weights; ``--config.dry_run_topology=v5e:8x8``
does so for a TPU slice from any host (needs libtpu, see the README), writes
``<workdir>/dry_run.json`` and exits with status 3 when a program does not fit
the chips' HBM. The synthetic demo is ``demo.py``.
"""

import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from lavi_jax import distributed, storage, train

flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard files go (a path or gs:// URI).",
                    required=True)
distributed.define_flags()
config_flags.DEFINE_config_file("config", None, "Config file, path[:arg].", lock_config=True)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    distributed.start_from_flags()
    if FLAGS.config.dry_run or FLAGS.config.dry_run_topology:
        try:
            report = train.dry_run(FLAGS.config, report_path=storage.join(FLAGS.workdir, "dry_run.json"))
        except (train.TopologyError, ValueError, OSError) as e:
            sys.exit(f"dry run: {e}")
        sys.exit(3 if report["fits"] is False else 0)
    try:
        _, metrics = train.train(FLAGS.config, FLAGS.workdir)
    except OSError as e:  # storage: a missing bucket, object or file, no credentials, an unreachable endpoint
        sys.exit(f"train: {e}")
    if jax.process_index() == 0:
        print({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()})


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
