"""Checkpoint porting between Hugging Face / PyTorch and lavi_jax.

``import_hf`` (HF -> lavi_jax), ``export_hf`` (lavi_jax -> HF + LaVi tensors),
``torch_lavi`` (the PyTorch LaVi reference), ``check_logits`` (parity check);
``mapping`` is the one name mapping both directions use, ``weights`` moves the tensors.
"""
