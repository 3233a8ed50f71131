"""Every `ff-jax` command on several processes: it joins the one JAX cluster before it touches a
device or a file and ends at a barrier, so `report` on two processes writes each file once, from
process 0; `bench` and `plan`, which measure or plan one machine, refuse with one line.

The order of joining, running and the barrier, and the refusals, are checked in this process;
`report` and `plan` also run as two real processes (`launch/tpu.py local`, ~15 s each).
"""

from __future__ import annotations

import jax
import pytest

from ff_jax import atomic_io, cli, parallel
from ff_jax.atomic_io import WRITE_LOG_ENV
from tests.helpers.local_pod import LocalPod, writes_by_path
from tests.helpers.pipeline_helpers import ff_jax_cmd
from tests.report.test_report import _write_run

TIMEOUT = 300

# Each command's arguments, enough to reach its runner (none of which runs here).
ARGV = {
    "run": ["run"],
    "filter": ["filter", "--model", "m", "--noisy", "n.jsonl", "--safe", "s.jsonl"],
    "report": ["report", "--run-dir", "r"],
    "baseline": ["baseline", "random", "--run-dir", "r"],
    "rounds": ["rounds", "--run-dir", "r"],
    "sweep": ["sweep", "--run-dir", "r"],
    "bench": ["bench"],
    "plan": ["plan"],
}


def test_the_table_names_every_command():
  assert set(ARGV) == set(cli.EXAMPLES)


@pytest.fixture
def steps(monkeypatch) -> list[str]:
  """What `ff-jax` does, in order: `join` (the cluster), the command's runner, `barrier`."""
  done: list[str] = []
  monkeypatch.setattr(parallel, "initialize_distributed", lambda: done.append("join"))
  monkeypatch.setattr(atomic_io, "barrier", lambda name: done.append("barrier"))

  def runner(name: str):
    return lambda args, cfg: done.append(name) or 0

  monkeypatch.setattr(cli, "COMMAND_RUNNERS",
                      {name: runner(name) for name in cli.COMMAND_RUNNERS})
  monkeypatch.setattr(cli, "_run_job", lambda args, cfg: done.append(args.command) or 0)
  return done


@pytest.mark.parametrize("command", sorted(ARGV))
def test_every_command_joins_the_cluster_first_and_ends_at_a_barrier(command, steps):
  assert cli.main(ARGV[command]) == 0
  assert steps == ["join", command, "barrier"]


@pytest.mark.parametrize("command", sorted(cli.ONE_PROCESS_COMMANDS))
def test_bench_and_plan_refuse_several_processes_with_one_line(command, steps, monkeypatch,
                                                               capsys):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert cli.main(ARGV[command]) == 2
  err = capsys.readouterr().err
  assert err.splitlines() == [f"ff-jax: error: ff-jax {command} runs on one process, not 2: "
                              f"{cli.ONE_PROCESS_COMMANDS[command]}; start it on one host, "
                              "without launch/tpu.py"]
  assert steps == ["join"]  # refused before it ran


def test_report_on_two_processes_writes_each_file_once_from_process_zero(tmp_path):
  run = _write_run(tmp_path)
  writes = tmp_path / "writes"
  LocalPod(ff_jax_cmd("report", "--run-dir", run), 2, 1, tmp_path / "logs",
           {WRITE_LOG_ENV: str(writes)}).wait(TIMEOUT)
  written = {run / "report.md", *(run / "plots").glob("*.png")}
  assert len(written) == 3  # the report and its histogram and P/R/F1 plots
  # A process outside the cluster would count itself process 0 too: each file twice.
  assert writes_by_path(writes) == {str(path): [0] for path in written}


def test_plan_on_two_processes_is_refused_with_one_line(tmp_path):
  pod = LocalPod(ff_jax_cmd("plan"), 2, 1, tmp_path / "logs")
  assert pod.status(TIMEOUT) == 2
  # The launcher stops the other process when one fails: it may not have got to say so.
  said = [[line for line in pod.lines(pid) if "error" in line.lower() or "Traceback" in line]
          for pid in (0, 1)]
  want = [f"ff-jax: error: ff-jax plan runs on one process, not 2: "
          f"{cli.ONE_PROCESS_COMMANDS['plan']}; start it on one host, without launch/tpu.py"]
  assert want in said and all(lines in ([], want) for lines in said), said
