"""Train LaVi.

    python train.py --config configs/demo.py --workdir /tmp/lavi_demo
    python train.py --config configs/lavi_qwen2_7b_siglip.py --workdir gs://... \\
        --config.data.train_json=data/llava.json --config.train.num_steps=5000

Run the same command on every host of a pod; pass --coordinator_address,
--num_processes and --process_id where JAX cannot detect them (CPU, bare GPU
clusters). ``--config.dry_run=True`` compiles the step and prints its memory
and FLOPs per device without allocating weights.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard files go.", required=True)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
config_flags.DEFINE_config_file("config", None, "Config file, path[:arg].", lock_config=True)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
    from lavi_jax import distributed

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    config = FLAGS.config
    if "demo" in config and config.demo.enabled:
        from lavi_jax import demo

        demo.run(config, FLAGS.workdir)
        return
    from lavi_jax import trainer

    result = trainer.train(config, FLAGS.workdir)
    result.pop("state", None)
    import jax

    if jax.process_index() == 0:
        print({k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()})


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
