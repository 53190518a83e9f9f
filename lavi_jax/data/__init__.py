"""Data: LLaVA-format records -> static-shape batches of tokens and pixels.

Entry points: ``make_train_iterator`` / ``make_eval_iterator`` (grain pipelines),
``make_components`` (the run's tokenizer and image processor, checked against the
model), ``make_tokenizer``, ``make_image_processor``. The batch layout is
``batch.BatchSpec``; the defaults of ``config.data`` are in ``lavi_jax.config``.
"""

from lavi_jax.data.bad_records import BadRecord, BadRecordBudgetExceeded, BadRecordTracker
from lavi_jax.data.batch import BatchSpec, bucket_length
from lavi_jax.data.collate import Collator, pad_batch
from lavi_jax.data.components import make_components
from lavi_jax.data.image_processor import ImageProcessor, load_image, make_image_processor
from lavi_jax.data.llava import ExampleBuilder
from lavi_jax.data.media import MediaLoader, inside_root, media_items
from lavi_jax.data.pipeline import DataIterator, make_eval_iterator, make_train_iterator, num_eval_batches
from lavi_jax.data.records import load_records, resolve_path
from lavi_jax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, make_tokenizer
from lavi_jax.data.video import load_video, sample_indices
