"""The CPU demo (``python demo.py``): a synthetic coloured-shapes VQA set (:mod:`lavi_jax.demo.synthetic`) and
LaVi vs text-only training on it (:mod:`lavi_jax.demo.run`)."""
