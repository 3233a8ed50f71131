"""Which rows each host builds (`host_rows.host_block`) and the row log (`FF_JAX_ROW_LOG`) every
batch builder writes through it: a log line is the rows of the batch it was written for, and the
blocks of every host make the one host's batch. (Hosts are simulated here by the builders'
`process_index`/`process_count`; tests/pipeline/test_multihost.py reads the logs of real ones.)"""

import numpy as np
import pytest

from ff_jax.data import batching
from ff_jax.data.host_rows import ROW_LOG_ENV, building, host_block
from tests.training.test_loop import examples as make_examples

BUCKETS = (16, 32, 64)
PAD = 0


def _lines(folder) -> list[tuple[str, list[str]]]:
  """(purpose, rows) of every line of process 0's row log."""
  out = []
  for line in (folder / "rows.0.log").read_text().splitlines():
    index, purpose, *rows = line.split(" ")
    assert index == "0"
    out.append((purpose, rows))
  return out


def _rows_of(batch: dict[str, np.ndarray]) -> list[str]:
  """A host batch's rows as the log writes them, from its example ids."""
  ids = batch["example_id"]
  rows = ids[:, None] if ids.ndim == 1 else ids
  return ["+".join(str(i) for i in row if i >= 0) or "-" for row in rows.tolist()]


# Packed rows are a multiple of the process count too: 2 for one host as well, as a run's
# `ModelRuntime.row_multiple` makes them on a mesh of two data-parallel shards, so that one host
# packs the batch two hosts pack.
ROW_MULTIPLE = 2


def _train_batches(examples, packing: bool, process_index: int, process_count: int):
  it = batching.TrainIterator(examples, 8, 3, BUCKETS, pad_id=PAD, packing=packing,
                              row_multiple=ROW_MULTIPLE, process_index=process_index,
                              process_count=process_count)
  return [it.next_batch()[0] for _ in range(4)]  # 4 steps: past the end of an epoch of 30


def _eval_batches(examples, packing: bool, process_index: int, process_count: int):
  return batching.eval_batches(examples, 8, BUCKETS, pad_id=PAD, packing=packing,
                               row_multiple=ROW_MULTIPLE, process_index=process_index,
                               process_count=process_count)


def test_host_block_is_block_p_of_the_global_rows():
  rows = list(range(12))
  blocks = [host_block(rows, p, 3) for p in range(3)]
  assert blocks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
  assert host_block([[1, 2], [3], [], []], 1, 2) == [[], []]


def test_the_log_names_the_purpose_and_each_row(tmp_path, monkeypatch):
  monkeypatch.setenv(ROW_LOG_ENV, str(tmp_path))
  with building("noisy_1-2"), building("stream_1"):
    host_block([5, -1, 7, 2], 0, 2)
  with building("score"):
    host_block([[3, 9], [], [np.int32(4)], [1]], 1, 2)
  host_block(np.asarray([8, 6]), 0, 1)
  assert _lines(tmp_path) == [("noisy_1-2/stream_1", ["5", "-"]), ("score", ["4", "1"]),
                              ("-", ["8", "6"])]


def test_no_log_without_the_switch(tmp_path, monkeypatch):
  monkeypatch.delenv(ROW_LOG_ENV, raising=False)
  monkeypatch.chdir(tmp_path)
  host_block([1, 2], 0, 2)
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("build", [_train_batches, _eval_batches])
def test_each_host_logs_the_rows_it_built_and_the_blocks_make_the_batch(
    tmp_path, monkeypatch, build, packing):
  """Two hosts' logged blocks of every batch, in host order, are the rows of the one host's batch,
  and each line is the rows of the batch it was logged for (its example ids)."""
  examples = make_examples(30, seed=0, lo=2, hi=41)  # 2 to 40 tokens, the second half a response
  logs = {hosts: tmp_path / f"hosts_{hosts}" for hosts in (1, 2)}
  built = {}
  for hosts, folder in logs.items():
    monkeypatch.setenv(ROW_LOG_ENV, str(folder))
    with building("phase"):
      built[hosts] = [build(examples, packing, p, hosts) for p in range(hosts)]
  whole = _lines(logs[1])
  halves = _lines(logs[2])  # host 0's batches, then host 1's
  assert len(halves) == 2 * len(whole) and len(whole) == len(built[1][0]) > 1
  for n, (purpose, rows) in enumerate(whole):
    assert purpose == "phase"
    assert rows == _rows_of(built[1][0][n])
    blocks = [halves[p * len(whole) + n][1] for p in range(2)]
    assert blocks == [_rows_of(built[2][p][n]) for p in range(2)]
    assert blocks[0] + blocks[1] == rows
