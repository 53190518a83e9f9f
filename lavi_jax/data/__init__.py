"""Data: LLaVA-format records -> static-shape batches of tokens and pixels.

Entry points: ``data_config`` (the ``config.data`` schema),
``make_train_iterator`` / ``make_eval_iterator`` (grain pipelines),
``make_tokenizer``, ``make_image_processor`` and ``write_synthetic_vqa``
(the demo dataset). The batch contract is documented in ``batching``.
"""

from lavi_jax.data.bad_records import BadRecord, BadRecordBudgetExceeded, BadRecordTracker
from lavi_jax.data.batching import Collator, pad_batch, select_bucket
from lavi_jax.data.config import data_config
from lavi_jax.data.image_processor import ImageProcessor, load_image, make_image_processor
from lavi_jax.data.llava import ExampleBuilder
from lavi_jax.data.pipeline import DataIterator, make_eval_iterator, make_train_iterator, num_eval_batches
from lavi_jax.data.records import load_records, resolve_path
from lavi_jax.data.synthetic import write_synthetic_vqa
from lavi_jax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, make_tokenizer
from lavi_jax.data.video import load_video, sample_indices
