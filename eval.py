"""Evaluate a LaVi checkpoint on benchmarks, data-parallel over every device of every process.

    python eval.py --config configs/demo.py --workdir /tmp/lavi_demo/modulation --config.evals.tasks=llava_json
    python eval.py --config configs/lavi_qwen2_7b_siglip.py --ckpt /ckpt/lavi7b --out /tmp/lavi7b_eval \\
        --config.evals.tasks=pope --config.evals.pope.questions=/data/pope/llava_pope_test.jsonl \\
        --config.evals.pope.annotations=/data/pope/coco --config.evals.pope.image_root=/data/coco/val2014

The model, tokenizer and image processor come from the checkpoint (``--ckpt``,
or the latest checkpoint of ``--workdir``); the config gives the mesh and the
tasks (``config.evals``, see ``lavi_jax/eval/tasks.py``). Results go to
``<out>/<task>.json`` (default ``<workdir>/results``; every path may be a
``gs://bucket/key`` URI) and a summary table is printed. Run the same command
on every host of a pod; pass --coordinator_address, --num_processes and
--process_id where JAX cannot detect them (CPU, bare GPU clusters).
"""

from absl import app, flags
from ml_collections import config_flags

from lavi_jax import checkpoint, distributed, storage
from lavi_jax.eval import evaluate_checkpoint

flags.DEFINE_string("workdir", None, "A training workdir: its latest checkpoint is evaluated; results go to <workdir>/results.")
flags.DEFINE_string("ckpt", None, "A checkpoint (workdir, checkpoint dir or step dir) to evaluate instead of --workdir's.")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_string("out", None, "Where results/<task>.json files go (default: <workdir>/results, else <ckpt>/results).")
distributed.define_flags()
config_flags.DEFINE_config_file("config", None, "Config file, path[:arg].", lock_config=False, accept_new_attributes=True)
FLAGS = flags.FLAGS


def output_dir() -> str:
    if FLAGS.out:
        return FLAGS.out
    if FLAGS.workdir:
        return storage.join(FLAGS.workdir, "results")
    directory = checkpoint.resolve(FLAGS.ckpt)
    parent = storage.parent(directory) if storage.basename(directory) == "checkpoints" else directory
    return storage.join(parent, "results")


def main(argv):
    del argv
    if not (FLAGS.ckpt or FLAGS.workdir):
        raise app.UsageError("pass --workdir or --ckpt")
    distributed.start_from_flags()
    out = output_dir()
    storage.check_writable(out)  # a missing bucket or no permission fails here, before the model is loaded
    evaluate_checkpoint(FLAGS.config, FLAGS.ckpt or FLAGS.workdir, out, step=FLAGS.step)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
