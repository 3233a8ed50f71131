"""`ff-jax` command line: run, filter, report.

  ff-jax run [CONFIG.yaml] [key=value ...] [--restart] [--until PHASE] [--from PHASE]
  ff-jax filter --model PATH --noisy FILE --safe FILE [--run-dir DIR] [key=value ...]
  ff-jax report RUN_DIR
  ff-jax baseline {random,oracle,replay} RUN_DIR
  ff-jax rounds RUN_DIR [--rounds R] [--heldout]
  ff-jax bench [CONFIG.yaml] [key=value ...] [--json FILE]
  ff-jax sweep [CONFIG.yaml] run_dir=DIR [key=value ...] [--restart]
  ff-jax plan [CONFIG.yaml] [key=value ...] [--hbm-gib G] [--topology SLICE] [--json FILE]

Errors a user can cause (config, data, checkpoints, run directories) print one line and exit 2.
Every command turns on JAX's persistent compilation cache before anything compiles
(`config.enable_compile_cache`): `run` and `filter` where their config's `compile_cache` says,
the others where `auto` puts it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ff_jax.errors import FFJaxError

if TYPE_CHECKING:
  from ff_jax.config import RunConfig


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="ff-jax", description="ForgetFilter in JAX.")
  sub = parser.add_subparsers(dest="command", required=True)

  run = sub.add_parser("run", help="run every phase (no CONFIG: the built-in demo)")
  run.add_argument("args", nargs="*", metavar="[CONFIG] key=value",
                   help="a YAML config (default: the embedded demo) and dotted overrides")
  run.add_argument("--restart", action="store_true",
                   help="clear the run directory and start over")
  run.add_argument("--until", metavar="PHASE", help="stop after this phase")
  run.add_argument("--from", dest="redo_from", metavar="PHASE",
                   help="run this phase and every later one again (e.g. filter, with another "
                        "filter.signal)")

  filt = sub.add_parser("filter", help="ForgetFilter on your own model and data")
  filt.add_argument("--model", required=True, help="HF folder or .gguf file of the aligned model")
  filt.add_argument("--noisy", required=True, help="noisy dataset (JSONL/CSV/hf://)")
  filt.add_argument("--safe", required=True, help="safe set (JSONL/CSV/hf://)")
  filt.add_argument("--run-dir", default="runs/filter")
  filt.add_argument("--restart", action="store_true")
  filt.add_argument("--until", metavar="PHASE")
  filt.add_argument("--from", dest="redo_from", metavar="PHASE")
  filt.add_argument("overrides", nargs="*", metavar="key=value")

  base = sub.add_parser("baseline", help="a baseline filter on a finished run (report row)")
  base.add_argument("name", choices=("random", "oracle", "replay"))
  base.add_argument("run_dir")

  rounds = sub.add_parser("rounds", help="long-term safety: interleaved downstream/safety rounds")
  rounds.add_argument("run_dir")
  rounds.add_argument("--rounds", type=int, default=3)
  rounds.add_argument("--heldout", action="store_true",
                      help="also the held-out metrics after every finetune (generation)")

  report = sub.add_parser("report", help="(re)write report.md and plots of a run directory")
  report.add_argument("run_dir")

  bench = sub.add_parser("bench", help="throughput and MFU of train, score and decode")
  bench.add_argument("args", nargs="*", metavar="[CONFIG] key=value",
                     help="a YAML bench config (default: configs/bench.yaml) and overrides")
  bench.add_argument("--json", metavar="FILE", help="write the full result as JSON here")

  sweep = sub.add_parser("sweep", help="safe-size x steps x seeds ablation as stacked replicas")
  sweep.add_argument("args", nargs="*", metavar="[CONFIG] key=value",
                     help="a YAML sweep config (default: configs/sweep.yaml) and overrides")
  sweep.add_argument("--restart", action="store_true", help="discard saved sweep chunks")

  plan = sub.add_parser("plan", help="memory per device of a run's compiled steps, no allocation")
  plan.add_argument("args", nargs="*", metavar="[CONFIG] key=value",
                    help="a run config (default: the embedded demo) and dotted overrides")
  plan.add_argument("--hbm-gib", type=float, help="device memory to fit (default: what the "
                    "device reports, or the TPU slice's HBM)")
  plan.add_argument("--topology", metavar="SLICE",
                    help="compile for a Cloud TPU slice such as v4-32 without TPU hardware "
                         "(needs libtpu)")
  plan.add_argument("--json", metavar="FILE", help="write the plan as JSON here")
  return parser


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
  if args and "=" not in args[0]:
    return args[0], args[1:]
  return None, args


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    return _dispatch(args)
  except FFJaxError as err:
    print(f"ff-jax: error: {err}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("ff-jax: interrupted; rerun the same command to resume", file=sys.stderr)
    return 130


def _run_config(args: argparse.Namespace) -> RunConfig:
  """The RunConfig of `ff-jax run` or `ff-jax filter`."""
  from ff_jax import config as config_lib

  if args.command == "run":
    path, overrides = _split_config(args.args)
    return config_lib.load_config(path, overrides)
  preset = Path(config_lib.__file__).parent / "configs" / "filter.yaml"
  return config_lib.load_config(preset, [
      f"model.source={args.model}", f"data.noisy={args.noisy}", f"data.safe={args.safe}",
      f"run_dir={args.run_dir}", *args.overrides])


def _dispatch(args: argparse.Namespace) -> int:
  from ff_jax import config as config_lib

  cfg = _run_config(args) if args.command in ("run", "filter") else None
  config_lib.enable_compile_cache(cfg.compile_cache if cfg is not None else "auto")
  if args.command == "report":
    from ff_jax.report.analysis import summary_figures
    from ff_jax.report.markdown import write_report

    path = write_report(Path(args.run_dir))
    print(path)
    print(summary_figures(Path(args.run_dir)))
    return 0

  if args.command == "bench":
    from ff_jax.perf.bench import BenchConfig
    from ff_jax.perf.bench import main as bench_main

    path, overrides = _split_config(args.args)
    bench_main(config_lib.load_dataclass(BenchConfig, path, overrides, "bench.yaml"), args.json)
    return 0

  if args.command == "sweep":
    from ff_jax.experiments.sweep import SweepConfig, run_sweep

    path, overrides = _split_config(args.args)
    out = run_sweep(config_lib.load_dataclass(SweepConfig, path, overrides, "sweep.yaml"),
                    restart=args.restart)
    print(f"report: {out / 'report.md'}")
    return 0

  if args.command == "plan":
    from ff_jax.perf.plan import plan_run, refusal, table

    path, overrides = _split_config(args.args)
    result = plan_run(config_lib.load_config(path, overrides), args.hbm_gib, args.topology)
    print(table(result))
    if args.json:
      from ff_jax.atomic_io import write_json_atomic

      write_json_atomic(args.json, result)
    message = refusal(result)
    if message:
      raise config_lib.ConfigError(message)
    return 0

  # Multi-host runs must start the distributed runtime before anything touches devices.
  from ff_jax import parallel

  parallel.initialize_distributed()
  if args.command == "baseline":
    from ff_jax.experiments.baselines import run_baseline

    print(run_baseline(args.run_dir, args.name))
    return 0
  if args.command == "rounds":
    from ff_jax.experiments.rounds import run_rounds

    print(run_rounds(args.run_dir, args.rounds, args.heldout))
    return 0
  from ff_jax.pipeline.driver import run_job
  from ff_jax.pipeline.layout import PHASES

  if args.until and args.until not in PHASES:
    raise config_lib.ConfigError(f"--until {args.until}: not a phase; phases are {PHASES}")
  root = run_job(cfg, restart=args.restart, until=args.until, redo_from=args.redo_from)
  from ff_jax.report.analysis import separation_warning, summary_figures

  if not args.until or args.until == PHASES[-1]:
    print(f"report: {root / 'report.md'}")
    print(summary_figures(root))
  if PHASES.index(args.until or PHASES[-1]) >= PHASES.index("filter"):
    # Last, where it is seen: the filter ran on scores that show no two groups.
    warning = separation_warning(root)
    if warning:
      print(warning)
  return 0


if __name__ == "__main__":
  sys.exit(main())
