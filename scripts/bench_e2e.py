"""End-to-end speed of the paper's method: ff_jax beside the paper's PyTorch code, same files.

Runs `ff-jax filter` with the paper's single-run method (`scoring.noisy_replicas=1
filter.signal=nll`, the `filter` preset's finetunes: 2 noisy epochs, 20 safety steps of 8, AdamW
5e-5) up to `score_after`, and the reference script
(`../shared/reference/ref_forgetfilter_torch.py`, when torch is installed) with the same
hyperparameters, in the order given (default: ff_jax, reference, reference, ff_jax, so each side
runs once first on a machine whose speed drifts). For every ff_jax run it prints each phase's wall
time split into compile, step checkpoints, output saves, work after steps (scoring, snapshots) and
the rest (compute), with the share of padded token slots, from the run's manifest (`finetunes` of
each phase entry); then the noisy + safety time of each side and their ratio for each adjacent pair
of runs.

  python scripts/bench_e2e.py --model GGUF --noisy N.jsonl --safe S.jsonl --out runs/bench_e2e \
      [--order ff_jax,reference] [key=value ...]

Extra `key=value` arguments are ff_jax config overrides (e.g. `data.packing=true`). Prints a
table and writes `<out>/bench_e2e.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ff_jax.atomic_io import write_json_atomic
from ff_jax.config import load_config
from ff_jax.report.fmt import markdown_table
from ff_jax.run_files import MANIFEST

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference" / "ref_forgetfilter_torch.py"
PAPER_METHOD = ("scoring.noisy_replicas=1", "filter.signal=nll")
TRAINING_PHASES = ("noisy", "safety")


def run_ff_jax(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
  """One cold `ff-jax filter` run up to score_after; its phases' times from the manifest."""
  cmd = [sys.executable, "-m", "ff_jax.cli", "filter", "--model", args.model, "--noisy",
         args.noisy, "--safe", args.safe, "--run-dir", str(run_dir), "--restart", "--until",
         "score_after", *PAPER_METHOD, *args.overrides]
  start = time.perf_counter()
  subprocess.run(cmd, check=True, cwd=REPO)
  wall = time.perf_counter() - start
  manifest = json.loads((run_dir / MANIFEST).read_text())
  phases = {}
  for name, entry in manifest["phases"].items():
    finetunes = entry.get("finetunes", {}).values()
    split = {key: sum(f.get(key, 0.0) for f in finetunes)
             for key in ("compile_seconds", "checkpoint_seconds", "output_save_seconds",
                         "hook_seconds", "token_slots", "padded_tokens")}
    overhead = sum(split[k] for k in ("compile_seconds", "checkpoint_seconds",
                                      "output_save_seconds", "hook_seconds"))
    phases[name] = {"seconds": entry["seconds"], **split,
                    "compute_seconds": entry["seconds"] - overhead,
                    "padded_share": (split["padded_tokens"] / split["token_slots"]
                                     if split["token_slots"] else None)}
  return {"side": "ff_jax", "wall_seconds": wall, "phases": phases,
          "training_seconds": sum(phases[p]["seconds"] for p in TRAINING_PHASES)}


def run_reference(args: argparse.Namespace, out: Path) -> dict[str, Any]:
  """One run of the reference script with the `filter` preset's hyperparameters."""
  cfg = load_config(REPO / "ff_jax" / "configs" / "filter.yaml", list(args.overrides))
  cmd = [sys.executable, str(args.reference), "--noisy", args.noisy, "--safe", args.safe,
         "--seed", str(cfg.seed), "--out", str(out),
         "--noisy_epochs", str(int(cfg.noisy.epochs)), "--safety_steps", str(cfg.safety.steps),
         "--batch", str(cfg.noisy.batch_size), "--lr", str(cfg.noisy.optim.learning_rate)]
  start = time.perf_counter()
  subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
  wall = time.perf_counter() - start
  times = json.loads(out.read_text())["times_s"]
  return {"side": "reference", "wall_seconds": wall, "phases": times,
          "training_seconds": sum(times[p] for p in TRAINING_PHASES)}


def phase_table(run: dict[str, Any]) -> list[str]:
  rows = []
  for name, p in run["phases"].items():
    if p["seconds"] < 0.05:  # phases this method skips (release, replicas)
      continue
    share = p["padded_share"]
    seconds = [p[key] for key in ("seconds", "compute_seconds", "compile_seconds",
                                  "checkpoint_seconds", "output_save_seconds", "hook_seconds")]
    rows.append([name, *(f"{value:.1f}" for value in seconds),
                 "" if share is None else f"{100 * share:.1f}%"])
  return markdown_table(["phase", "wall s", "compute s", "compile s", "step checkpoints s",
                         "output saves s", "after-step work s", "padded slots"], rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="the aligned model (HF folder or .gguf)")
  parser.add_argument("--noisy", required=True)
  parser.add_argument("--safe", required=True)
  parser.add_argument("--out", default="runs/bench_e2e")
  parser.add_argument("--reference", type=Path, default=REFERENCE)
  parser.add_argument("--order", default="ff_jax,reference,reference,ff_jax")
  parser.add_argument("overrides", nargs="*", help="ff_jax config overrides, key=value")
  args = parser.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  order = args.order.split(",")
  if "reference" in order and importlib.util.find_spec("torch") is None:
    print("torch is not installed: the reference runs are skipped", file=sys.stderr)
    order = [side for side in order if side != "reference"]
  runs = []
  for i, side in enumerate(order):
    if side == "ff_jax":
      runs.append(run_ff_jax(args, out / f"ff_jax_{i}"))
    elif side == "reference":
      runs.append(run_reference(args, out / f"reference_{i}.json"))
    else:
      raise SystemExit(f"--order: {side!r} is neither ff_jax nor reference")
    print(f"[{i}] {side}: noisy + safety {runs[-1]['training_seconds']:.1f}s "
          f"(whole run {runs[-1]['wall_seconds']:.1f}s)", file=sys.stderr)
  lines = []
  for i, run in enumerate(runs):
    lines += [f"run {i}: {run['side']}, noisy + safety {run['training_seconds']:.1f} s, whole "
              f"run {run['wall_seconds']:.1f} s", ""]
    if run["side"] == "ff_jax":
      lines += phase_table(run) + [""]
  for first, second in zip(runs, runs[1:]):
    pair = {r["side"]: r["training_seconds"] for r in (first, second)}
    if len(pair) == 2:
      lines.append(f"pair {first['side']} then {second['side']}: ff_jax / reference noisy + "
                   f"safety = {pair['ff_jax']:.1f} / {pair['reference']:.1f} s = "
                   f"{pair['ff_jax'] / pair['reference']:.2f}")
  print("\n".join(lines))
  write_json_atomic(out / "bench_e2e.json", {"order": order, "runs": runs,
                                             "overrides": args.overrides})


if __name__ == "__main__":
  main()
