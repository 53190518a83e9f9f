"""Serving: an OpenAI-compatible HTTP server over a continuous-batching engine.

``engine.Engine`` owns the device: a fixed set of decode slots, each request
prefilled alone and inserted into a free slot between decode steps.
``server`` is the HTTP front (FastAPI on uvicorn): ``python -m lavi_jax.serve --ckpt CKPT``.
"""
