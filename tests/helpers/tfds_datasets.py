"""Tiny TensorFlow Datasets datasets prepared offline in a test's folder (no TensorFlow: the
array_record and parquet formats), read by ff_jax from their files as a user's would be."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds


def prepare_tfds(data_dir: Path, name: str, splits: Mapping[str, list[dict[str, Any]]],
                 features: Mapping[str, Any], file_format: str = "array_record",
                 shuffled: bool = False) -> Path:
  """Prepare the TFDS dataset `name` (version 1.0.0) under `data_dir` from `{split: rows}` with
  `features` (feature name → TFDS feature or dtype); returns the dataset's folder. Rows are
  stored in the order given, or, if `shuffled`, in TFDS's default order (by a hash of the key)."""

  def info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(dict(features)),
                                 disable_shuffling=not shuffled)

  def split_generators(self, dl_manager) -> dict[str, Any]:
    return {split: self._generate_examples(rows) for split, rows in splits.items()}

  def generate_examples(self, rows):
    yield from enumerate(rows)

  # Not registered: ff_jax must read it from its files alone, as it would a user's dataset.
  builder_class = type(f"Prepared_{name}", (tfds.core.GeneratorBasedBuilder,), {
      "name": name, "VERSION": tfds.core.Version("1.0.0"), "_info": info,
      "_split_generators": split_generators, "_generate_examples": generate_examples,
  }, skip_registration=True)
  builder = builder_class(data_dir=str(data_dir), file_format=file_format)
  builder.download_and_prepare(download_dir=str(Path(data_dir) / "downloads"))
  return Path(builder.data_dir)
