"""Training: the loop (:func:`train`), the step and optimizer, the dry run.

    from lavi_jax import train
    state, metrics = train.train(config, workdir)
    report = train.dry_run(config)          # compile only: memory and FLOPs per device
    report = train.dry_run(config, topology="v5e:8x8", programs=("train", "prefill", "decode"))
"""

from lavi_jax.train.dry_run import dry_run
from lavi_jax.train.topology import TopologyError
from lavi_jax.train.optimizer import (STAGES, init_opt_state, is_trainable, learning_rate_schedule, lr_multiplier,
                                      make_optimizer, merge, partition, run_patterns, scale_by_path,
                                      trainable_patterns)
from lavi_jax.train.state import TrainState, create_state, opt_state_shardings, state_shardings
from lavi_jax.train.step import StepProgram, jit_train_step, local_batch_size, loss_terms, make_train_step


def __getattr__(name):  # the loop (input pipeline, checkpoints, evaluation) loads on first use
    if name in ("NonFiniteError", "initial_params", "train"):
        from lavi_jax.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
