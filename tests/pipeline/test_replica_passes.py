"""How the replica phases keep a trained pass, and refuse the files of an older ff_jax."""

from __future__ import annotations

import pytest

from ff_jax.errors import RunDirError
from ff_jax.pipeline import ensembles
from ff_jax.pipeline.rundir import RunDir


def test_a_run_directory_with_old_pass_files_is_refused_in_one_line(tmp_path):
  run = RunDir(tmp_path)
  ensembles.refuse_old_pass_files(run)  # none: nothing to refuse
  (tmp_path / "replicas").mkdir()
  (tmp_path / "replicas" / "pass_0.json").write_text('{"seeds": [1], "nll": [[0.5]]}')
  with pytest.raises(RunDirError) as err:
    ensembles.refuse_old_pass_files(run)
  assert str(err.value) == (f"run directory {run.root} was written by an older ff_jax "
                            "(replicas/pass_0.json); rerun with --restart")


def test_a_saved_pass_is_read_back_only_for_its_own_seeds(tmp_path):
  path = tmp_path / "ckpt" / "safety_replicas" / "replicas_1-2.json"
  step_checkpoints = tmp_path / "ckpt" / "safety_replicas" / "replicas_1-2"
  step_checkpoints.mkdir(parents=True)
  assert ensembles._saved_pass(path, [11, 12]) is None  # not trained yet
  ensembles._save_pass(path, [11, 12], [[0.25, 0.5], [1.0, 2.0]], [step_checkpoints])
  assert not step_checkpoints.exists()  # the pass is kept: its step checkpoints are dropped
  assert ensembles._saved_pass(path, [11, 12]) == [[0.25, 0.5], [1.0, 2.0]]
  assert ensembles._saved_pass(path, [11, 13]) is None  # another pass under the same name
