"""Command-line tools for porting checkpoints between Hugging Face / PyTorch and lavi_jax.

``import_hf`` (HF -> lavi_jax checkpoint), ``export_hf`` (lavi_jax checkpoint -> HF + LaVi tensors),
``check_logits`` (parity check against PyTorch); ``torch_lavi`` is the PyTorch LaVi reference and
``random_hf`` randomises HF models for parity checks. The conversions themselves are :mod:`lavi_jax.hf`.
"""
