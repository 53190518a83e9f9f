"""The CPU demo: LaVi vs a text-only model on a synthetic VQA set, in a few minutes on 2 cores.

    python demo.py --workdir /tmp/lavi_demo

``demo.py`` writes the data and sets ``config.data``'s paths; ``train.py`` takes
this config too, for the same model on your own data (``--config.data.train_json``).
Conversations of mixed length can be packed several per row of ``max(seq_buckets)``
tokens (``--config.data.packing=True``, ``pack_max_images`` items per row); the demo's
own questions are of one length and its tiny model gains nothing from long packed
rows (``python -m benchmarks.packing``), so it trains unpacked.

A tiny SigLIP-shaped tower and a tiny Qwen2-shaped decoder, trained from
scratch with the built-in byte-level tokenizer on coloured-shape questions
whose answers depend on the image. Each image's 1-3 shapes sit centred in cells
of a 4 x 4 grid, one ViT patch per cell, all of one size, and answers restate
their subject ("The circle is red."): this lets a from-scratch tower tell the
shapes apart, and the model learn which shape a question names, within the
time budget. What LaVi must learn late is to bind the shape a question
names to its patch (colour and side need it, count does not): the model
answers from the text alone for the first 400-500 steps. At learning rate
1e-3 that binding formed on some seeds only (seed 1: colour 81 %, 2e-3: 52 %);
at 5e-4 every seed 0-4 reaches 100 % on every kind in the same 1,200 steps.
Half of the training questions ask "which side" (``train_kinds`` lists it
twice), over 12,000 training images. Other seeds: ``--config.demo.seed=N --config.train.seed=N``.
The same run is repeated for every fusion
in ``demo.fusions`` and the held-out exact-match accuracies are printed side
by side with the majority-answer rate.
"""

from lavi_jax import config as C


def get_config(arg: str = ""):
    model = C.model(
        fusion="modulation",
        image_token_id=259,  # the byte tokenizer's <image>
        llm=C.llm(arch="qwen2", vocab_size=264, hidden_size=64, intermediate_size=192, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  attention_bias=True, max_position_embeddings=512),
        vision=C.vision(type="siglip", hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                        image_size=64, patch_size=16, layer_norm_eps=1e-6, feature_layers=(-1,), posemb_init="sincos2d"),
        projector=C.projector(type="mlp2x_gelu", pool=1, max_frames=1),
        conditioner=C.conditioner(type="attention", width=128, num_heads=8, final_norm=True),
    )
    config = C.experiment(model)
    config.data.update(tokenizer="byte", processor="siglip", image_size=64, seq_buckets=(68,), max_images=1,
                       num_frames=1, num_threads=2)
    config.train.update(num_steps=1200, batch_size=32, learning_rate=5e-4, warmup_steps=100, weight_decay=0.0,
                        clip_grad_norm=1.0, trainable="all", log_every=50, checkpoint_every=400, keep_checkpoints=1)
    config.evals.batch_size = 100
    config.demo = C.ConfigDict({"fusions": ("modulation", "none"), "num_train": 12000,
                                "num_eval": 300, "image_size": 64, "seed": 0, "train_turns": 1,
                                "train_kinds": ("colour", "count", "side", "side"), "grid": 4, "sentences": True,
                                "jitter": False})
    if arg == "quick":  # a smoke run for tests
        config.train.update(num_steps=20, log_every=5, checkpoint_every=10)
        config.demo.update(num_train=64, num_eval=24)
    return config
