"""Data layer: records and their IO, prompt templates and tokenization, batching, the demo world.

Every source becomes a list of `Record`s (`formats.load_source` reads any source into `records`),
is encoded into token ids with an exact prompt/response boundary (`templates`), and is served as
fixed-shape numpy batches (`batching`).
`demo` generates the built-in, seeded demo world that `ff-jax run` uses by default.
"""

from ff_jax.data.batching import (
    TrainIterator,
    eval_batches,
    make_batch,
    pick_bucket,
)
from ff_jax.data.records import (
    KINDS,
    Record,
    fingerprint,
    read_jsonl,
    write_jsonl_atomic,
)
from ff_jax.data.templates import (
    PLAIN_TEMPLATE,
    EncodedExample,
    PromptTemplate,
    encode_example,
    encode_examples,
    encode_prompt,
)

__all__ = [
    "KINDS", "PLAIN_TEMPLATE", "EncodedExample", "PromptTemplate", "Record", "TrainIterator",
    "encode_example", "encode_examples", "encode_prompt", "eval_batches", "fingerprint",
    "make_batch", "pick_bucket", "read_jsonl", "write_jsonl_atomic",
]
