"""Flax (linen) modules: vision tower, projector, conditioners, decoder and the LaVi model; the concat splice layout."""
