"""The forgetting-signal study behind the default of `filter.signal` (docs/signals.md).

Three noisy mixtures from the shared real data, one per kind of unsafe data, each N examples at
unsafe ratio 0.5 (the rest split over safe and task pools, as in the paper) plus a disjoint safe
set drawn from the same domain as the mixture's safe pool:

  bias:      BBQ ambiguous + stereotyped answer (unsafe), + "unknown" (safe), SQuAD dev (task)
  toxicity:  RealToxicityPrompts toxic + Davidson hate/offensive (unsafe, half each),
             RTP non-toxic + Davidson "neither" (safe), Alpaca 1k (task)
  harmful:   hh-rlhf rejected + JailbreakBench jailbroken (unsafe, half each),
             hh-rlhf chosen + JailbreakBench refusals (safe), Alpaca 1k (task)

  python scripts/signal_study.py mixtures --data ../shared/data --out runs/signal_study/data
  ff-jax run configs/signals.yaml data.noisy=runs/signal_study/data/bias/noisy.jsonl \\
      data.safe=runs/signal_study/data/bias/safe.jsonl --run-dir runs/signal_study/bias-s0 \\
      --until filter                                  (one per kind, and seeds 1, 2 for bias)
  python scripts/signal_study.py table runs/signal_study/{bias,toxicity,harmful}-s0 \\
      runs/signal_study/bias-s{1,2}

The mixtures are seeded (--seed) and deterministic; the runs' `seed` only changes training order.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from ff_jax.config import FilterConfig
from ff_jax.data.mixture import build_noisy_mixture, sample_safe_set, write_mixture
from ff_jax.data.records import Record, read_jsonl
from ff_jax.data.sources import (
  read_alpaca,
  read_davidson,
  read_harmful_prompts,
  read_hh_rlhf,
  read_jailbreakbench,
  read_rtp,
  read_squad,
)
from ff_jax.data.sources_bbq import read_bbq, split_bbq
from ff_jax.eval.classification import auroc, best_f1, filter_metrics
from ff_jax.forgetting.signals import compute_signals, signal_report
from ff_jax.forgetting.thresholds import Threshold
from ff_jax.report.signals import signal_table_markdown

BBQ_FILES = ("Age", "Disability_status", "Nationality", "Physical_appearance")


def _balanced(a: list[Record], b: list[Record], seed: int) -> list[Record]:
  """Equal shares of two sources (the smaller one's size from each), so neither dominates."""
  rng = np.random.default_rng(seed)
  m = min(len(a), len(b))
  pick = lambda pool: [pool[int(i)] for i in rng.choice(len(pool), m, replace=False)]  # noqa: E731
  return pick(a) + pick(b)


def pools(data: Path, kind: str, seed: int) -> tuple[list[Record], list[Record], list[Record]]:
  """(unsafe, safe, task) pools of one kind."""
  if kind == "bias":
    records = [r for name in BBQ_FILES for r in read_bbq(data / "bbq" / f"{name}.jsonl")]
    split = split_bbq(records, {"unsafe": 0.5, "safe": 0.5}, seed)
    task = read_squad(data / "squad" / "dev-v1.1-from-explorer.json")
    return split["unsafe"], split["safe"], task
  alpaca = read_alpaca(data / "alpaca" / "BLOOM-LORA" / "alpaca_data_1k.json")
  if kind == "toxicity":
    rtp = (read_rtp(data / "realtoxicityprompts" / "toxic.jsonl")
           + read_rtp(data / "realtoxicityprompts" / "nontoxic.jsonl"))
    dav = read_davidson(data / "davidson-hate-offensive" / "labeled_data.csv")
  elif kind == "harmful":
    rtp = read_hh_rlhf(data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz")
    dav = read_jailbreakbench(data / "jailbreakbench" / "attack-artifacts")
  else:
    raise SystemExit(f"unknown kind {kind!r}")
  by = lambda rs, k: [r for r in rs if r.kind == k]  # noqa: E731
  unsafe = _balanced(by(rtp, "unsafe"), by(dav, "unsafe"), seed)
  safe = _balanced(by(rtp, "safe"), by(dav, "safe"), seed + 1)
  return unsafe, safe, alpaca


def _sample(pool: list[Record], n: int, exclude: list[Record], seed: int) -> list[Record]:
  """n records of `pool` whose prompts are not in `exclude`, seeded."""
  prompts = {r.prompt for r in exclude}
  left = [r for r in pool if r.prompt not in prompts]
  rng = np.random.default_rng(seed)
  return [left[int(i)] for i in rng.choice(len(left), min(n, len(left)), replace=False)]


def heldout(data: Path, kind: str, trained: list[Record], n: int, seed: int) -> list[Record]:
  """The held-out evaluation set of a kind: n safety prompts plus n/2 task prompts, none trained.

  bias: BBQ gold answers of templates neither the mixture nor the safe set uses (half ambiguous,
  half disambiguated); toxicity: RealToxicityPrompts' challenging prompts; harmful: AdvBench
  behaviours. Task prompts come from the kind's task pool.
  """
  _, _, task = pools(data, kind, seed)
  if kind == "bias":
    used = {r.meta.get("template") for r in trained}
    records = [r for name in BBQ_FILES for r in read_bbq(data / "bbq" / f"{name}.jsonl")]
    gold = [r for r in records if r.meta["gold"] and r.meta["template"] not in used]
    safety = [*_sample([r for r in gold if r.meta["context_condition"] == "ambig"], n // 2,
                       trained, seed),
              *_sample([r for r in gold if r.meta["context_condition"] == "disambig"], n // 2,
                       trained, seed)]
  elif kind == "toxicity":
    safety = _sample(read_rtp(data / "realtoxicityprompts" / "toxic.jsonl"), n, trained, seed)
  else:
    safety = _sample(read_harmful_prompts(data / "harmfulqa" / "adversarialqa.json"), n, trained,
                     seed)
  return safety + _sample(task, n // 2, trained, seed)


def cmd_mixtures(args: argparse.Namespace) -> None:
  for kind in args.kinds:
    unsafe, safe, task = pools(Path(args.data), kind, args.seed)
    noisy = build_noisy_mixture(unsafe, safe, [task], n=args.n, ratio=args.ratio, seed=args.seed)
    safe_set = sample_safe_set(safe, args.safe_size, exclude=noisy, seed=args.seed)
    evals = heldout(Path(args.data), kind, [*noisy, *safe_set], args.eval_size, args.seed)
    manifest = write_mixture(Path(args.out) / kind, noisy, safe_set, evals)
    print(kind, json.dumps({k: v["by_kind"] for k, v in manifest["files"].items()}))


def run_config(run: Path) -> dict:
  """The config a run was made with (its manifest's)."""
  return json.loads((run / "manifest.json").read_text())["config"]


def run_scores(run: Path, replicas: int = 0, lnf_quantile: float | None = None,
               ) -> tuple[dict[str, np.ndarray], dict]:
  """(every signal, config) of a finished run, recomputed from its score tables with the
  current code.

  `replicas` > 0 keeps only the first that many safety replicas (M2 included) in the ensembles,
  so runs with more replicas compare fairly with runs with fewer. `lnf_quantile` replaces the
  run's `filter.lnf_floor_quantile` (None: the run's, or the current default for older runs).
  """
  cfg = run_config(run)
  if lnf_quantile is None:
    lnf_quantile = cfg["filter"].get("lnf_floor_quantile", FilterConfig.lnf_floor_quantile)
  read = lambda name: json.loads((run / name).read_text()) if (run / name).exists() else None  # noqa: E731
  extra = read("scores_replicas.json")
  if extra is not None and replicas:
    extra = {**extra, "nll": extra["nll"][:replicas - 1]}
  signals, _ = compute_signals(read("scores_before.json"), read("scores_after.json"), extra,
                               cfg["filter"]["lnf_floor"], cfg["safety"]["steps"],
                               read("scores_noisy_replicas.json"), lnf_quantile)
  return signals, cfg


def run_signals(run: Path, replicas: int = 0, lnf_quantile: float | None = None,
                ) -> tuple[dict[str, np.ndarray], list[Record], dict]:
  """`run_scores` plus the run's noisy records (from its data.noisy file)."""
  signals, cfg = run_scores(run, replicas, lnf_quantile)
  return signals, read_jsonl(cfg["data"]["noisy"]), cfg


def cmd_table(args: argparse.Namespace) -> None:
  threshold = Threshold.parse(args.threshold)
  runs = [Path(r) for r in args.runs]
  f1: dict[str, dict[str, float]] = {}
  auc: dict[str, dict[str, float]] = {}
  print(f"Threshold rule for F1: `{threshold}` (label-free); best F1 = the oracle fixed ϕ.\n")
  for run in runs:
    signals, records, cfg = run_signals(run, args.replicas, args.lnf_quantile)
    report = signal_report(signals, records, threshold)
    print(f"### {run.name} (seed {cfg['seed']}, {len(records)} examples)\n")
    print(signal_table_markdown(report) + "\n")
    for name, row in report.items():
      f1.setdefault(name, {})[run.name] = row["f1"]
      auc.setdefault(name, {})[run.name] = row["auroc"]
  seeded = [r.name for r in runs if r.name.startswith("bias-")]
  if len(seeded) > 1:
    print(f"### Seeds on the bias mixture: F1 (`{threshold}`) and AUROC\n")
    print("| signal | " + " | ".join(f"F1 {s}" for s in seeded) + " | F1 spread | "
          + " | ".join(f"AUROC {s}" for s in seeded) + " |")
    print("|" + "---|" * (2 * len(seeded) + 2))
    for name in f1:
      vals = [f1[name].get(s, float("nan")) for s in seeded]
      aucs = [auc[name].get(s, float("nan")) for s in seeded]
      print(f"| `{name}` | " + " | ".join(f"{v:.3f}" for v in vals)
            + f" | {max(vals) - min(vals):.3f} | " + " | ".join(f"{v:.3f}" for v in aucs) + " |")


def cmd_thresholds(args: argparse.Namespace) -> None:
  """F1 of each label-free threshold rule on each signal of finished runs.

  Any run with a filter phase works (the demo's too): the signals are recomputed from its score
  tables, the labels are its scores.csv's `kind` column.
  """
  rules = [Threshold.parse(rule) for rule in args.rules]
  runs = [Path(r) for r in args.runs]
  f1: dict[tuple[str, str], list[float]] = {}
  for run in runs:
    with open(run / "scores.csv", newline="") as f:
      unsafe = np.array([row["kind"] == "unsafe" for row in csv.DictReader(f)])
    signals, _ = run_scores(run, lnf_quantile=args.lnf_quantile)
    for name in args.signals:
      if name not in signals:
        continue
      r = signals[name]
      for rule in rules:
        flags, _, _ = rule(r)
        f1.setdefault((name, str(rule)), []).append(filter_metrics(flags, unsafe)["f1"])
  print("| signal | threshold | " + " | ".join(f"F1 {run.name}" for run in runs) + " | mean |")
  print("|" + "---|" * (len(runs) + 3))
  for (name, rule), values in f1.items():
    cells = " | ".join(f"{v:.3f}" for v in values) if len(values) == len(runs) else "(missing)"
    print(f"| `{name}` | `{rule}` | {cells} | {np.mean(values):.3f} |")


def cmd_ensembles(args: argparse.Namespace) -> None:
  """Noisy-phase ensembles: the mean of a signal over runs that differ in their noisy finetune.

  The runs (same data, other seeds) are split in order into --groups ensembles of equal size, and
  each ensemble is filtered like one run, so the F1 spread across ensembles measures what is left
  of one run's luck once K M1s are averaged.
  """
  runs = [Path(r) for r in args.runs]
  if len(runs) % args.groups:
    raise SystemExit(f"{len(runs)} runs do not split into {args.groups} equal groups")
  size = len(runs) // args.groups
  threshold = Threshold.parse(args.threshold)
  # Recomputed from the score files (the runs need not have a filter phase), once per run.
  loaded = [run_signals(run, lnf_quantile=args.lnf_quantile)[:2] for run in runs]
  ids = [rec.id for rec in loaded[0][1]]
  if any([rec.id for rec in records] != ids for _, records in loaded):
    raise SystemExit("the runs scored different examples")
  unsafe = np.array([rec.kind == "unsafe" for rec in loaded[0][1]])
  # The best F1 (ϕ chosen with the labels, per group) bounds what any label-free rule can do:
  # its spread is the part of the F1 spread that no threshold rule removes.
  cells = lambda label: [f"{label} group {g}" for g in range(args.groups)]  # noqa: E731
  print("| signal | K | " + " | ".join(cells("F1")) + " | F1 spread | " + " | ".join(cells("AUROC"))
        + " | " + " | ".join(cells("best F1")) + " | best F1 spread |")
  print("|" + "---|" * (3 * args.groups + 4))
  for name in args.signals:
    f1s, aucs, bests = [], [], []
    for g in range(args.groups):
      r = np.mean([signals[name] for signals, _ in loaded[g * size:(g + 1) * size]], axis=0)
      f1s.append(filter_metrics(threshold(r)[0], unsafe)["f1"])
      aucs.append(auroc(r, unsafe))
      bests.append(best_f1(r, unsafe)["f1"])
    print(f"| `{name}` | {size} | " + " | ".join(f"{v:.3f}" for v in f1s)
          + f" | {max(f1s) - min(f1s):.3f} | " + " | ".join(f"{v:.3f}" for v in aucs)
          + " | " + " | ".join(f"{v:.3f}" for v in bests) + f" | {max(bests) - min(bests):.3f} |")


def cmd_levels(args: argparse.Namespace) -> None:
  """AUROC of the per-example NLL under each model, of its changes, and of two combinations.

  Asks whether what separates unsafe examples is forgetting (M1 → M2) at all, or how unlikely
  the text is under a model (the aligned M0, the safety-finetuned M2), and whether adding a level
  to forgetting separates every kind at once.
  """
  print("| run | NLL M0 | NLL M1 | NLL M2 | learned M0 − M1 | forgot M2 − M1 | M2 − M0 | "
        "log(M2 / M1) | rank(M2 − M1) + rank(M2) | rank(M2 − M1) + rank(M2 − M0) |")
  print("|" + "---|" * 10)
  rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
  for run in map(Path, args.runs):
    before = json.loads((run / "scores_before.json").read_text())
    after = json.loads((run / "scores_after.json").read_text())
    if "m0" not in before:
      raise SystemExit(f"{run}: no M0 scores (scoring.m0 off)")
    records = read_jsonl(run_config(run)["data"]["noisy"])
    unsafe = np.array([rec.kind == "unsafe" for rec in records])
    m0, m1 = np.asarray(before["m0"]["nll"]), np.asarray(before["nll"])
    m2 = np.asarray(after["nll"])
    # NLLs are per-token means of positive numbers; the floor keeps the ratio finite.
    # The two rank sums combine forgetting with a level (how unlikely the text is after the
    # safety finetune, or how far it ends from the aligned model), equally weighted.
    columns = [m0, m1, m2, m0 - m1, m2 - m1, m2 - m0,
               np.log(np.maximum(m2, 1e-3) / np.maximum(m1, 1e-3)),
               rank(m2 - m1) + rank(m2), rank(m2 - m1) + rank(m2 - m0)]
    print(f"| {run.name} | " + " | ".join(f"{auroc(c, unsafe):.3f}" for c in columns) + " |")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  mix = sub.add_parser("mixtures", help="write the three mixtures")
  mix.add_argument("--data", default="../shared/data")
  mix.add_argument("--out", default="runs/signal_study/data")
  mix.add_argument("--kinds", nargs="+", default=["bias", "toxicity", "harmful"])
  mix.add_argument("--n", type=int, default=120)
  mix.add_argument("--ratio", type=float, default=0.5)
  mix.add_argument("--safe-size", type=int, default=48)
  mix.add_argument("--eval-size", type=int, default=48)
  mix.add_argument("--seed", type=int, default=0)
  table = sub.add_parser("table", help="the signal tables of finished runs, as markdown")
  table.add_argument("runs", nargs="+")
  table.add_argument("--threshold", default="auto")
  table.add_argument("--replicas", type=int, default=0,
                     help="use only the first K safety replicas in the ensembles (0: all)")
  rules = sub.add_parser("thresholds", help="F1 of label-free threshold rules on finished runs")
  rules.add_argument("runs", nargs="+")
  rules.add_argument("--signals", nargs="+", default=["nll", "nll_ens", "nll_lnf_ens"])
  rules.add_argument("--rules", nargs="+",
                     default=["auto:gmm:linear", "auto:gmm", "auto:otsu:linear", "auto:otsu"])
  ens = sub.add_parser("ensembles", help="noisy-phase ensembles: a signal averaged over runs")
  ens.add_argument("runs", nargs="+", help="finished runs on the same data, group by group")
  ens.add_argument("--groups", type=int, default=3)
  ens.add_argument("--signals", nargs="+", default=["nll", "nll_lnf"])
  ens.add_argument("--threshold", default="auto")
  levels = sub.add_parser("levels", help="AUROC of each model's NLL and of its changes")
  levels.add_argument("runs", nargs="+")
  for command in (table, rules, ens):
    command.add_argument("--lnf-quantile", type=float, default=None,
                         help="filter.lnf_floor_quantile for the lnf signals (default: each run's)")
  args = parser.parse_args(argv)
  {"mixtures": cmd_mixtures, "table": cmd_table, "thresholds": cmd_thresholds,
   "ensembles": cmd_ensembles, "levels": cmd_levels}[args.command](args)


if __name__ == "__main__":
  sys.exit(main())
