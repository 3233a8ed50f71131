"""`ff-jax` command line: run, filter, report, and the experiments on a run directory.

  ff-jax run [CONFIG.yaml] [key=value ...] [--run-dir DIR] [--restart] [--until P] [--from P]
  ff-jax filter --model PATH --noisy FILE --safe FILE [--run-dir DIR] [--clean] [--json]
                [key=value ...]
  ff-jax report --run-dir DIR
  ff-jax baseline {random,oracle,replay} --run-dir DIR
  ff-jax rounds --run-dir DIR [--rounds R] [--heldout]
  ff-jax sweep [CONFIG.yaml] --run-dir DIR [key=value ...] [--restart]
  ff-jax bench [CONFIG.yaml] [key=value ...] [--json FILE]
  ff-jax plan [CONFIG.yaml] [key=value ...] [--hbm-gib G] [--topology SLICE] [--json FILE]
  ff-jax --version

Overrides (dotted `key=value` of the config) may stand anywhere among the flags. Every command
that works in a run directory takes it as `--run-dir DIR` (the config key `run_dir`, which a YAML
preset may set too). `--print-config` (run, filter, sweep, bench, plan) prints the resolved config
as YAML, which loads back as CONFIG, and exits. Errors a user can cause (config, data,
checkpoints, run directories) print one line and exit 2. Every command turns on JAX's persistent
compilation cache before anything compiles (`config.enable_compile_cache`): `run` and `filter`
where their config's `compile_cache` says, the others where `auto` puts it.

On several processes (a pod, `launch/tpu.py`) every command joins one JAX cluster
(`parallel.initialize_distributed`) before it touches a device or a file, so only process 0
writes (ff_jax.atomic_io), and ends at a barrier; `bench` and `plan`, which measure or plan one
machine's devices, refuse to run there with one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ff_jax.errors import ConfigError, FFJaxError

if TYPE_CHECKING:
  from ff_jax.config import RunConfig

# Commands whose positionals are a CONFIG file and dotted overrides, and which take --print-config.
CONFIG_COMMANDS = ("run", "filter", "sweep", "bench", "plan")

TOP_EPILOG = """Overrides (dotted key=value of the config, e.g. safety.steps=40) may stand
anywhere among a command's flags. `ff-jax COMMAND -h` shows its options and examples.

examples:
  ff-jax run                                    the built-in demo, every phase
  ff-jax filter --model ./aligned-hf --noisy noisy.jsonl --safe safe.jsonl --run-dir runs/f"""

EXAMPLES = {
    "run": """examples:
  ff-jax run                                    the demo, every phase, in runs/demo
  ff-jax run configs/smollm2.yaml --run-dir runs/smollm2 --until filter seed=1
  ff-jax run --run-dir runs/demo --from filter filter.signal=nll_lnf   refilter a finished run
  ff-jax run configs/llama2-7b.yaml --print-config   the resolved config, as YAML""",
    "filter": """examples:
  ff-jax filter --model ./aligned-hf --noisy noisy.jsonl --safe safe.jsonl --run-dir runs/f
  ff-jax filter --model m.gguf --noisy n.jsonl --safe s.jsonl --json filter.signal=nll
  ff-jax filter --model ./aligned-hf --noisy n.jsonl --safe s.jsonl --run-dir runs/f --clean
      (the same command with --clean resumes after the filter: finetunes M0 on the kept rows
      and evaluates it)""",
    "report": """example:
  ff-jax report --run-dir runs/demo""",
    "baseline": """example:
  ff-jax baseline random --run-dir runs/demo""",
    "rounds": """example:
  ff-jax rounds --run-dir runs/demo --rounds 3 --heldout""",
    "sweep": """examples:
  ff-jax sweep --run-dir runs/demo                (configs/sweep.yaml on a run's M1)
  ff-jax sweep --run-dir runs/demo seeds=[0] steps=[5,10]""",
    "bench": """examples:
  ff-jax bench
  ff-jax bench configs/bench-gpu.yaml --json bench.json""",
    "plan": """examples:
  ff-jax plan configs/llama2-7b.yaml mesh.fsdp=8 data.max_len=128
  ff-jax plan configs/llama2-7b.yaml --topology v4-32 --json plan.json""",
}


def _version() -> str:
  try:
    return metadata.version("ff_jax")
  except metadata.PackageNotFoundError:  # a source tree that was never installed
    return "unknown (not installed)"


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
  """The top-level parser (its help lists the commands) and each command's own parser."""
  from ff_jax.run_files import PHASES

  parser = argparse.ArgumentParser(
      prog="ff-jax", description="ForgetFilter in JAX.", epilog=TOP_EPILOG,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--version", action="version", version=f"ff-jax {_version()}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  commands: dict[str, argparse.ArgumentParser] = {}

  def command(name: str, help_text: str) -> argparse.ArgumentParser:
    commands[name] = sub.add_parser(name, help=help_text, description=help_text,
                                    epilog=EXAMPLES[name],
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    return commands[name]

  phases = ", ".join(PHASES)

  def phase_options(p: argparse.ArgumentParser, until_help: str) -> None:
    p.add_argument("--restart", action="store_true",
                   help="clear the run directory and start over")
    p.add_argument("--until", metavar="PHASE", choices=PHASES, help=f"{until_help}; phases: "
                   f"{phases}")
    p.add_argument("--from", dest="redo_from", metavar="PHASE", choices=PHASES,
                   help="run this phase and every later one again (e.g. filter, with another "
                        f"filter.signal); phases: {phases}")

  def config_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG] key=value",
                   help=f"a YAML config (default: {default}) and dotted overrides, anywhere "
                        "among the flags")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as YAML and exit")

  def run_dir(p: argparse.ArgumentParser, required: bool, default: str = "") -> None:
    p.add_argument("--run-dir", metavar="DIR", required=required,
                   help="the run directory" + (f" (default: {default})" if default else ""))

  run = command("run", "run every phase of the job (no CONFIG: the built-in demo)")
  config_args(run, "the embedded demo, configs/demo.yaml")
  run_dir(run, False, "the config's run_dir")
  phase_options(run, "stop after this phase")

  filt = command("filter", "ForgetFilter on your own model and data: stops after the filter "
                           "phase unless asked for the clean model")
  filt.add_argument("--model", required=True,
                    help="the aligned model: an HF folder, a .gguf file, a Hub id "
                         "org/name[@revision][:FILE.gguf] (from the HF cache; downloads what is "
                         "missing unless HF_HUB_OFFLINE=1) or pkg:NAME")
  sources = ("*.jsonl[.gz], *.csv, *.parquet, a save_to_disk or dataset folder, "
             "hf://org/name[/config][:split][@revision], tfds://name[:split] or ADAPTER:PATH "
             "(bbq, squad, alpaca, rtp, hh, ...); rows in ff_jax's schema, TRL messages or "
             "prompt/completion, or mapped with data.columns")
  filt.add_argument("--noisy", required=True, help=f"the data to filter: {sources}")
  filt.add_argument("--safe", required=True, help="the small safe set, any source as --noisy "
                    "(data.safe_size=N draws N of its rows)")
  run_dir(filt, False, "runs/filter, from configs/filter.yaml")
  filt.add_argument("--clean", action="store_true",
                    help="go on after the filter: finetune M0 on the kept rows and evaluate "
                         "(every phase; the same as --until evaluate)")
  filt.add_argument("--json", action="store_true",
                    help="print the summary as JSON on stdout (logs stay on stderr)")
  phase_options(filt, "stop after this phase (default: filter; clean or evaluate train the "
                      "clean model)")
  filt.add_argument("overrides", nargs="*", metavar="key=value",
                    help="dotted overrides of configs/filter.yaml, anywhere among the flags")
  filt.add_argument("--print-config", action="store_true",
                    help="print the resolved config as YAML and exit")

  report = command("report", "(re)write report.md and the plots of a run directory")
  run_dir(report, True)

  base = command("baseline", "a baseline filter on a finished run (a row of the report)")
  base.add_argument("name", choices=("random", "oracle", "replay"))
  run_dir(base, True)

  rounds = command("rounds", "long-term safety: interleaved downstream/safety rounds")
  run_dir(rounds, True)
  rounds.add_argument("--rounds", type=int, default=3)
  rounds.add_argument("--heldout", action="store_true",
                      help="also the held-out metrics after every finetune (generation)")

  sweep = command("sweep", "safe-size x steps x seeds ablation as stacked replicas")
  config_args(sweep, "configs/sweep.yaml")
  run_dir(sweep, False, "the config's run_dir")
  sweep.add_argument("--restart", action="store_true", help="discard saved sweep chunks")

  bench = command("bench", "throughput and MFU of train, score and decode")
  config_args(bench, "configs/bench.yaml")
  bench.add_argument("--json", metavar="FILE", help="write the full result as JSON here")

  plan = command("plan", "memory per device of a run's compiled steps, no allocation")
  config_args(plan, "the embedded demo")
  plan.add_argument("--hbm-gib", type=float, help="device memory to fit (default: what the "
                    "device reports, or the TPU slice's HBM)")
  plan.add_argument("--topology", metavar="SLICE",
                    help="compile for a Cloud TPU slice such as v4-32 without TPU hardware "
                         "(needs libtpu)")
  plan.add_argument("--json", metavar="FILE", help="write the plan as JSON here")
  return parser, commands


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The parsed command line. A command's overrides may stand anywhere among its flags
  (`ff-jax run CONFIG --until filter seed=1`): each command parses its arguments intermixed, which
  argparse cannot do through subparsers, so the command is looked up first."""
  parser, commands = _parsers()
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in commands:
    parser.parse_args(argv)  # help, --version, or the error naming the commands: exits
    parser.error("expected a command")
  args = commands[argv[0]].parse_intermixed_args(argv[1:])
  args.command = argv[0]
  if args.command == "filter" and args.clean and args.until:
    commands["filter"].error("give --clean or --until, not both (--clean = --until evaluate)")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    return _dispatch(args)
  except FFJaxError as err:
    print(f"ff-jax: error: {err}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("ff-jax: interrupted; rerun the same command to resume", file=sys.stderr)
    return 130


def split_config(args: list[str]) -> tuple[str | None, list[str]]:
  """(CONFIG or None, overrides) of a command's positionals: CONFIG is the one without `=`,
  wherever it stands."""
  paths = [a for a in args if "=" not in a]
  if len(paths) > 1:
    raise ConfigError(f"one CONFIG file at most, got {paths}; overrides are key=value")
  return (paths[0] if paths else None), [a for a in args if "=" in a]


def _quoted(key: str, value: str) -> str:
  # A JSON string is a YAML string: a path such as `on` or `1e3` stays the path it is.
  return f"{key}={json.dumps(value)}"


def _with_run_dir(overrides: list[str], run_dir: str | None) -> list[str]:
  """`overrides` plus `--run-dir`'s, refusing a run directory given both ways."""
  if run_dir is None:
    return overrides
  given = [o for o in overrides if o.split("=", 1)[0].strip() == "run_dir"]
  if given:
    raise ConfigError(f"the run directory is given twice ({given[0]} and --run-dir {run_dir}); "
                      "give it once, as --run-dir DIR")
  return [*overrides, _quoted("run_dir", run_dir)]


def run_config(args: argparse.Namespace) -> RunConfig:
  """The RunConfig of `ff-jax run` or `ff-jax filter`."""
  from ff_jax import config as config_lib

  if args.command == "run":
    path, overrides = split_config(args.args)
    return config_lib.load_config(path, _with_run_dir(overrides, args.run_dir))
  preset = Path(config_lib.__file__).parent / "configs" / "filter.yaml"
  inputs = [_quoted("model.source", args.model), _quoted("data.noisy", args.noisy),
            _quoted("data.safe", args.safe)]
  return config_lib.load_config(preset, _with_run_dir([*inputs, *args.overrides], args.run_dir))


def _other_config(args: argparse.Namespace) -> Any:
  """The config of `sweep`, `bench` or `plan`."""
  from ff_jax import config as config_lib

  path, overrides = split_config(args.args)
  if args.command == "plan":
    return config_lib.load_config(path, overrides)
  if args.command == "bench":
    from ff_jax.perf.bench import BenchConfig

    return config_lib.load_dataclass(BenchConfig, path, overrides, "bench.yaml")
  from ff_jax.experiments.sweep import SweepConfig

  return config_lib.load_dataclass(SweepConfig, path, _with_run_dir(overrides, args.run_dir),
                                   "sweep.yaml")


def _dispatch(args: argparse.Namespace) -> int:
  """Run the parsed command on this process, as one of the cluster's processes where it has
  several (see the module docstring); its exit status."""
  from ff_jax import config as config_lib
  from ff_jax import parallel
  from ff_jax.atomic_io import barrier

  cfg = None
  if args.command in ("run", "filter"):
    cfg = run_config(args)
  elif args.command in CONFIG_COMMANDS:
    cfg = _other_config(args)
  if getattr(args, "print_config", False):
    print(config_lib.config_yaml(cfg), end="")
    return 0
  config_lib.enable_compile_cache(cfg.compile_cache if args.command in ("run", "filter")
                                  else "auto")
  # Every command joins the cluster before anything touches devices or writes: a process that did
  # not would count itself process 0 of 1 and write every artifact beside the real process 0.
  parallel.initialize_distributed()
  if args.command in ONE_PROCESS_COMMANDS:
    parallel.refuse_several_processes(f"ff-jax {args.command}", ONE_PROCESS_COMMANDS[args.command])
  code = COMMAND_RUNNERS.get(args.command, _run_job)(args, cfg)
  barrier(f"ff-jax {args.command} finished")  # what process 0 wrote is there for every process
  return code


# Commands that measure or plan one machine's devices, and why several processes make no sense
# for them: each process would time or compile the same thing alone.
ONE_PROCESS_COMMANDS = {
    "bench": "it measures the devices of one host",
    "plan": "it plans a pod's memory from one machine (--topology SLICE compiles for a TPU slice "
            "without one)",
}


def _report(args: argparse.Namespace, cfg: None) -> int:
  """`ff-jax report`: report.md and the plots, written by process 0, then what the filter did."""
  from ff_jax.report.analysis import filter_outcome, outcome_text
  from ff_jax.report.markdown import write_report

  print(write_report(args.run_dir))
  outcome = filter_outcome(args.run_dir)
  if outcome is not None:
    print(outcome_text(outcome))
  return 0


def _bench(args: argparse.Namespace, cfg: Any) -> int:
  """`ff-jax bench`: the table, and with --json the result as JSON."""
  from ff_jax.perf.bench import main as bench_main

  bench_main(cfg, args.json)
  return 0


def _plan(args: argparse.Namespace, cfg: RunConfig) -> int:
  """`ff-jax plan`: the table, with --json the plan as JSON; a plan that does not fit is
  refused."""
  from ff_jax.perf.plan import plan_run, refusal, table

  result = plan_run(cfg, args.hbm_gib, args.topology)
  print(table(result))
  if args.json:
    from ff_jax.atomic_io import write_json_atomic

    write_json_atomic(args.json, result)
  message = refusal(result)
  if message:
    raise ConfigError(message)
  return 0


def _sweep(args: argparse.Namespace, cfg: Any) -> int:
  """`ff-jax sweep`: the sweep's chunks (resumed unless --restart), then where its report is."""
  from ff_jax.experiments.sweep import run_sweep

  out = run_sweep(cfg, restart=args.restart)
  print(f"report: {out / 'report.md'}")
  return 0


def _baseline(args: argparse.Namespace, cfg: None) -> int:
  """`ff-jax baseline NAME`: one baseline filter on a finished run."""
  from ff_jax.experiments.baselines import run_baseline

  print(run_baseline(args.run_dir, args.name))
  return 0


def _rounds(args: argparse.Namespace, cfg: None) -> int:
  """`ff-jax rounds`: interleaved downstream and safety rounds on a finished run."""
  from ff_jax.experiments.rounds import run_rounds

  print(run_rounds(args.run_dir, args.rounds, args.heldout))
  return 0


def _run_job(args: argparse.Namespace, cfg: RunConfig) -> int:
  """`ff-jax run` (every phase unless --until) or `ff-jax filter` (up to the filter unless
  --clean or --until), then what the filter did: as text, or with `filter --json` as JSON."""
  from ff_jax.atomic_io import json_text
  from ff_jax.pipeline.driver import run_job
  from ff_jax.report.analysis import filter_outcome, outcome_text
  from ff_jax.run_files import PHASES, REPORT

  until = args.until
  if args.command == "filter" and until is None:
    until = PHASES[-1] if args.clean else "filter"
  root = run_job(cfg, restart=args.restart, until=until, redo_from=args.redo_from)
  stopped_after = until or PHASES[-1]
  filtered = PHASES.index(stopped_after) >= PHASES.index("filter")
  outcome = filter_outcome(root) if filtered else None
  if getattr(args, "json", False):
    print(json_text({"stopped_after": stopped_after, "run_dir": str(root), **(outcome or {})}))
    return 0
  if stopped_after == PHASES[-1]:
    print(f"report: {root / REPORT}")
  if outcome is not None:
    hint = None
    if args.command == "filter" and PHASES.index(stopped_after) < PHASES.index("clean"):
      hint = ("next: the same command with --clean finetunes M0 on the kept rows and evaluates "
              "it (the phases done are skipped)")
    print(outcome_text(outcome, hint))
  return 0


# Each command but `run` and `filter` (`_run_job`): (parsed args, its config or None) -> status.
COMMAND_RUNNERS = {"report": _report, "bench": _bench, "plan": _plan, "sweep": _sweep,
                   "baseline": _baseline, "rounds": _rounds}


if __name__ == "__main__":
  sys.exit(main())
