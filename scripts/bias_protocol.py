"""Tuning and validation bias mixtures, to choose the filter's default honestly (docs/fidelity.md).

A default (signal, ϕ, template, optimizer) is chosen on the *tuning* mixture and argued for on the
*validation* mixtures only. The two sides share no BBQ category, no prompt and no prompt layout:

  tuning:      BBQ Age; task rows from the even-numbered SQuAD articles and Alpaca rows; prompts
               as the readers write them ("Context: …\\nQuestion: …", the BBQ question and options)
               in `tune-Age`, and the same rows with every prompt in a layout of the tuning side's
               own ("Request: … / Answer:", a cue shared with the safe set) in `tune-Age-cue`
  validation:  BBQ Disability_status, Nationality, Physical_appearance (one mixture each); task rows
               from the odd-numbered SQuAD articles and Alpaca rows; every prompt in the Alpaca
               "### Instruction / ### Input / ### Response" layout

Each mixture is built like the paper's (and like the mixture of issue #18): 240 rows at unsafe
ratio 0.5 = 120 biased answers, 40 "unknown" answers, 40 short-answer SQuAD questions and 40
Alpaca instructions; its safe set is 80 "unknown" answers of the category's other templates.

  python scripts/bias_protocol.py mixtures --data ../shared/data --out runs/protocol/data
  python scripts/bias_protocol.py table runs/protocol/val-*-s*      (after `ff-jax filter` runs)
  python scripts/bias_protocol.py ensembles runs/protocol/val-*-paper-s*   (one run vs two)
  python scripts/bias_protocol.py auto runs/protocol/val-*-paper-s* runs/demo-s*   (signal: auto)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import re
import tempfile
from pathlib import Path

import numpy as np

from ff_jax.atomic_io import write_json_atomic
from ff_jax.config import config_from_dict
from ff_jax.data.mixture import build_noisy_mixture, sample_safe_set, write_mixture
from ff_jax.data.records import Record
from ff_jax.data.sources import read_alpaca, read_squad
from ff_jax.data.sources_bbq import read_bbq, split_bbq
from ff_jax.data.widths import bucket_ladder
from ff_jax.eval.classification import auroc, best_f1, filter_metrics
from ff_jax.forgetting.choice import choose_signal
from ff_jax.forgetting.signals import replica_forgetting
from ff_jax.forgetting.thresholds import Threshold
from ff_jax.pipeline.context import open_run
from ff_jax.training.checkpoints import restore_params

TUNING = ("Age",)
VALIDATION = ("Disability_status", "Nationality", "Physical_appearance")
N, RATIO, SAFE_SIZE = 240, 0.5, 80


def task_pools(data: Path, side: str) -> list[list[Record]]:
  """[SQuAD, Alpaca] task rows of one side: even (tuning) or odd (validation) articles and rows."""
  parity = 0 if side == "tuning" else 1
  squad = read_squad(data / "squad" / "dev-v1.1-from-explorer.json")
  titles = list(dict.fromkeys(r.meta["title"] for r in squad))
  keep = {t for i, t in enumerate(titles) if i % 2 == parity}
  squad = [r for r in squad if r.meta["title"] in keep]
  alpaca = read_alpaca(data / "alpaca" / "BLOOM-LORA" / "alpaca_data_1k.json")
  alpaca = [r for r in alpaca if int(r.id.split(":")[1]) % 2 == parity]
  return [squad, alpaca]


def alpaca_layout(record: Record) -> Record:
  """The record with its prompt in the Alpaca instruction/input/response layout."""
  if record.source == "squad":
    context, question = re.match(r"Context: (.*)\nQuestion: (.*)", record.prompt, re.S).groups()
    instruction, extra = question, context
  elif record.source == "bbq":
    instruction, extra = "Answer the multiple-choice question.", record.prompt
  else:
    instruction, _, extra = record.prompt.partition("\n\n")
  prompt = f"### Instruction:\n{instruction}\n\n"
  if extra.strip():
    prompt += f"### Input:\n{extra}\n\n"
  prompt += "### Response:\n"
  return Record(id=record.id, prompt=prompt, response=record.response, kind=record.kind,
                category=record.category, source=record.source, meta=record.meta)


def cue_layout(record: Record) -> Record:
  """The record with its prompt, as the reader wrote it, between a "Request:" header and an
  "Answer:" cue: the tuning side's own shared layout (the validation side uses Alpaca's)."""
  return dataclasses.replace(record, prompt=f"Request:\n{record.prompt}\n\nAnswer:\n")


# Mixture name suffix -> how its prompts are laid out (tuning side only).
TUNING_LAYOUTS = {"": None, "-cue": cue_layout}


def build(data: Path, category: str, side: str, seed: int) -> tuple[list[Record], list[Record]]:
  """(noisy mixture, safe set) of one BBQ category on one side of the protocol, prompts as the
  readers write them on the tuning side and in the Alpaca layout on the validation side."""
  split = split_bbq(read_bbq(data / "bbq" / f"{category}.jsonl"), {"unsafe": 0.5, "safe": 0.5},
                    seed)
  noisy = build_noisy_mixture(split["unsafe"], split["safe"], task_pools(data, side), n=N,
                              ratio=RATIO, seed=seed)
  safe = sample_safe_set(split["safe"], SAFE_SIZE, exclude=noisy, seed=seed)
  if side == "validation":
    noisy, safe = [alpaca_layout(r) for r in noisy], [alpaca_layout(r) for r in safe]
  return noisy, safe


def cmd_mixtures(args: argparse.Namespace) -> None:
  data = Path(args.data)
  prompts: dict[str, set[str]] = {}
  for side, categories in (("tuning", TUNING), ("validation", VALIDATION)):
    layouts = TUNING_LAYOUTS if side == "tuning" else {"": None}
    for category, (suffix, layout) in itertools.product(categories, layouts.items()):
      noisy, safe = build(data, category, side, args.seed)
      if layout is not None:  # the same rows as the plain mixture, so only the layout differs
        noisy, safe = [layout(r) for r in noisy], [layout(r) for r in safe]
      name = f"{'tune' if side == 'tuning' else 'val'}-{category}{suffix}"
      manifest = write_mixture(Path(args.out) / name, noisy, safe)
      prompts.setdefault(side, set()).update(r.prompt for r in [*noisy, *safe])
      print(name, json.dumps({k: v["by_kind"] for k, v in manifest["files"].items()}))
  # The two sides never share a prompt (task rows come from other articles and rows, and the
  # layouts differ): a default chosen on one side is measured on text it never saw.
  shared = prompts["tuning"] & prompts["validation"]
  if shared:
    raise SystemExit(f"{len(shared)} prompts are on both sides, e.g. {next(iter(shared))[:80]!r}")


def run_table(run: Path, signals: list[str]) -> dict[str, dict[str, float]]:
  """Per signal: AUROC, best F1 and, at the run's own filter, F1, drops and task rows dropped."""
  with open(run / "scores.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  kinds = np.array([r["kind"] for r in rows])
  unsafe = kinds == "unsafe"
  filt = json.loads((run / "filter.json").read_text())
  out = {}
  for name in signals:
    if f"r_{name}" not in rows[0]:
      continue
    score = np.array([float(r[f"r_{name}"]) for r in rows])
    row = {"auroc": auroc(score, unsafe), "best_f1": best_f1(score, unsafe)["f1"]}
    if name == filt["signal"]:
      flagged = np.array([r["flagged"] == "1" for r in rows])
      tp = (flagged & unsafe).sum()
      p, r_ = tp / max(flagged.sum(), 1), tp / unsafe.sum()
      row |= {"f1": 2 * p * r_ / (p + r_) if p + r_ else 0.0, "dropped": int(flagged.sum()),
              "task_dropped": float((flagged & (kinds == "task")).sum() / (kinds == "task").sum())}
    out[name] = row
  return out


def cmd_table(args: argparse.Namespace) -> None:
  print("| run | signal | AUROC | best F1 | F1 at ϕ | dropped | task rows dropped |")
  print("|---|---|---|---|---|---|---|")
  for run in map(Path, args.runs):
    for name, row in run_table(run, args.signals).items():
      at_phi = (f"{row['f1']:.3f} | {row['dropped']} | {row['task_dropped']:.1%}"
                if "f1" in row else "– | – | –")
      print(f"| {run.name} | `{name}` | {row['auroc']:.3f} | {row['best_f1']:.3f} | {at_phi} |")


def _signal(run: Path, name: str) -> tuple[dict[str, float], dict[str, str]]:
  """({id: r}, {id: kind}) of one finished run's scores.csv; `nll_tail` of a run scored before
  it existed comes from its `rescored.json` (`rescore`)."""
  with open(run / "scores.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  kinds = {r["id"]: r["kind"] for r in rows}
  if f"r_{name}" not in rows[0] and name == "nll_tail" and (run / "rescored.json").exists():
    table = json.loads((run / "rescored.json").read_text())
    rise = np.subtract(table["M2"]["nll_tail"], table["M1"]["nll_tail"])
    return dict(zip(table["id"], rise.tolist())), kinds
  return {r["id"]: float(r[f"r_{name}"]) for r in rows}, kinds


def _quality(r: np.ndarray, kinds: np.ndarray, threshold: Threshold) -> dict[str, float]:
  flags = np.asarray(threshold(r)[0], dtype=bool)
  unsafe = kinds == "unsafe"
  return {"auroc": auroc(r, unsafe), "f1": filter_metrics(flags, unsafe)["f1"],
          "task_dropped": float(flags[kinds == "task"].mean())}


def cmd_ensembles(args: argparse.Namespace) -> None:
  """One run of the paper's method (`nll` of each seed) beside the default, `nll` averaged over
  two M1s: each pair of seed runs is one two-replica run (the pipeline's `nll_nens` is that mean,
  each M1 with its own data order and safety finetune)."""
  threshold = Threshold.parse(args.threshold)
  runs = [Path(r) for r in args.runs if (Path(r) / "scores.csv").exists()]
  for r in sorted(set(map(Path, args.runs)) - set(runs)):
    print(f"(left out: {r} has no scores.csv yet)")
  by_mixture: dict[str, list[Path]] = {}
  for run in runs:
    by_mixture.setdefault(run.name.rsplit("-s", 1)[0], []).append(run)
  print(f"Threshold `{threshold}`, label-free; the share of task rows it dropped.\n")
  print("| mixture | runs | signal | AUROC | F1 | task rows dropped |")
  print("|---|---|---|---|---|---|")
  for mixture, group in by_mixture.items():
    signals = {run: _signal(run, args.signal) for run in group}
    ids = sorted(signals[group[0]][0])
    kinds = np.array([signals[group[0]][1][i] for i in ids])
    sets = [[run] for run in group] + [list(pair) for pair in itertools.combinations(group, 2)]
    for members in sets:
      r = np.mean([[signals[run][0][i] for i in ids] for run in members], axis=0)
      q = _quality(r, kinds, threshold)
      seeds = "+".join(run.name.rsplit("-s", 1)[1] for run in members)
      name = args.signal if len(members) == 1 else f"{args.signal} over 2 M1s"
      print(f"| {mixture} | s{seeds} | `{name}` | {q['auroc']:.3f} | {q['f1']:.3f} | "
            f"{q['task_dropped']:.1%} |")


def _pair_columns(runs: list[Path]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(kinds, {nll, nll_tail: [K, N]}) of single runs of one mixture, as one K-replica run."""
  per_run = {name: [_signal(run, name) for run in runs] for name in ("nll", "nll_tail")}
  ids = sorted(per_run["nll"][0][0])
  kinds = np.array([per_run["nll"][0][1][i] for i in ids])
  return kinds, {name: np.array([[table[i] for i in ids] for table, _ in tables])
                 for name, tables in per_run.items()}


def _run_columns(run: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(kinds, {nll, nll_tail: [K, N]}) of one run that trained its own noisy replicas."""
  read = lambda name: json.loads((run / name).read_text())  # noqa: E731
  per_replica = replica_forgetting(read("scores_before.json"), read("scores_after.json"),
                                   read("scores_noisy_replicas.json"))
  with open(run / "scores.csv", newline="") as f:
    kinds = np.array([row["kind"] for row in csv.DictReader(f)])
  return kinds, per_replica


def cmd_auto(args: argparse.Namespace) -> None:
  """`filter.signal: auto` beside the two signals it chooses between, on every pair of single
  runs of a mixture (<mixture>-s<seed>) and on every run that trained two noisy replicas itself
  (the demo's): AUROC / F1 / task rows dropped at the automatic ϕ, each candidate's replica
  agreement, and which one the rule took."""
  threshold = Threshold.parse(args.threshold)
  units: list[tuple[str, np.ndarray, dict[str, np.ndarray]]] = []
  singles: dict[str, list[Path]] = {}
  for run in map(Path, args.runs):
    if (run / "scores_noisy_replicas.json").exists():
      units.append((run.name, *_run_columns(run)))
    elif (run / "scores.csv").exists():
      singles.setdefault(run.name.rsplit("-s", 1)[0], []).append(run)
  for mixture, group in singles.items():
    for pair in itertools.combinations(sorted(group), 2):
      seeds = "+".join(run.name.rsplit("-s", 1)[1] for run in pair)
      units.append((f"{mixture} s{seeds}", *_pair_columns(list(pair))))
  print("| runs | `nll_nens` | `nll_tail_nens` | ρ nll / tail | κ nll / tail | `auto` picks | "
        "`auto` |")
  print("|---|---|---|---|---|---|---|")
  for name, kinds, per_replica in units:
    signals = {"nll_nens": per_replica["nll"].mean(0),
               "nll_tail_nens": per_replica["nll_tail"].mean(0)}
    chosen, why = choose_signal(signals, per_replica, threshold, args.max_drop_fraction)
    cells = {}
    for signal, r in signals.items():
      q = _quality(r, kinds, threshold)
      cells[signal] = f"{q['auroc']:.3f} / {q['f1']:.3f} / {q['task_dropped']:.1%}"
    rows = why["candidates"]
    rhos = " / ".join(f"{rows[s]['correlation']:.3f}" + ("" if rows[s]["separated"] else "*")
                      for s in signals)
    kappas = " / ".join(f"{rows[s]['agreement']:.2f}" for s in signals)
    print(f"| {name} | {cells['nll_nens']} | {cells['nll_tail_nens']} | {rhos} | {kappas} | "
          f"`{chosen}` | {cells[chosen]} |")
  print("\nCells: AUROC / F1 / task rows dropped at the automatic ϕ; ρ: the replicas' rank "
        "correlation (the rule), * where the separation check finds no two groups; κ: the "
        "agreement of the replicas' own filters (the separation check's).")


def cmd_widths(args: argparse.Namespace) -> None:
  """What `data.max_len: auto` costs against a fixed limit on one mixture, without a model: the
  `filter` preset's packed batches of the noisy finetune (one data order, the same for every
  limit), the safety finetune and a score pass, counted as token slots (every matmul's cost) and
  Σ rows·width² (the attention scores'), with the rows each limit cuts."""
  from ff_jax.config import load_config
  from ff_jax.data.batching import Batching
  from ff_jax.data.templates import PromptTemplate
  from ff_jax.pipeline.context import encode_inputs
  from ff_jax.pipeline.inputs import load_inputs
  from ff_jax.pipeline.rundir import RunDir
  from ff_jax.training.loop import phase_steps

  print("| data.max_len | buckets | rows cut | finetune token slots | attention Σ rows·T² "
        "| score token slots | score attention Σ rows·T² |")
  print("|---|---|---|---|---|---|---|")
  for limit in args.limits:
    widths = [] if limit == "auto" else [f"data.max_len={limit}",
                                         f"data.buckets={list(bucket_ladder(int(limit)))}"]
    cfg = load_config("configs/filter.yaml", [
        f"model.source={args.model}", f"data.noisy={args.mixture}/noisy.jsonl",
        f"data.safe={args.mixture}/safe.jsonl", "run_dir=/nonexistent", *widths])
    inputs = load_inputs(cfg, RunDir(cfg.run_dir))
    cfg, noisy, safe = encode_inputs(cfg, inputs, PromptTemplate(mode=cfg.data.template))
    slots = attention = 0
    for phase, examples in ((cfg.noisy, noisy), (cfg.safety, safe)):
      batching = Batching(phase.batch_size, cfg.data.buckets, inputs.tokenizer.pad_id, True)
      iterator = batching.train_iterator(examples, cfg.seed)
      for _ in range(phase_steps(phase.steps, phase.epochs, len(examples), phase.batch_size,
                                 "noisy")):
        rows, width = iterator.batch_shape(iterator.next_indices())
        slots, attention = slots + rows * width, attention + rows * width ** 2
    scoring = Batching(cfg.scoring.batch_size, cfg.data.buckets, inputs.tokenizer.pad_id, True)
    shapes = [b["tokens"].shape for b in scoring.eval_batches(noisy)]
    print(f"| {limit} → {cfg.data.max_len} | {list(cfg.data.buckets)} | "
          f"{sum(e.truncated for e in noisy + safe)} | {slots} | {attention:.3g} | "
          f"{sum(r * t for r, t in shapes)} | {sum(r * t * t for r, t in shapes):.3g} |")


def cmd_rescore(args: argparse.Namespace) -> None:
  """The per-token tables of runs trained before the score pass gave `first_nll`: their saved M1
  and M2 scored again as the pipeline scores them (same config, same score step), into
  `<run>/rescored.json`; the run's own files are left as they are."""
  for run in map(Path, args.runs):
    tree = json.loads((run / "manifest.json").read_text())["config"]
    with tempfile.TemporaryDirectory() as scratch:
      ctx = open_run(config_from_dict({**tree, "run_dir": scratch}, str(run / "manifest.json")))
      tables = {}
      for model in ("M1", "M2"):
        params = restore_params(run / "models" / model, ctx.runtime.abstract_with_shardings())
        tables[model] = ctx.noisy_means(params, f"{run.name}/{model}")
    ids = [r.id for r in ctx.inputs.noisy]
    write_json_atomic(run / "rescored.json", {"id": ids, **tables})
    print(f"{run}: rescored {len(ids)} examples")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  mix = sub.add_parser("mixtures", help="write the tuning and validation mixtures")
  mix.add_argument("--data", default="../shared/data")
  mix.add_argument("--out", default="runs/protocol/data")
  mix.add_argument("--seed", type=int, default=0, help="mixture seed (runs vary the train seed)")
  tab = sub.add_parser("table", help="AUROC / F1 / task rows dropped of finished runs")
  tab.add_argument("runs", nargs="+")
  tab.add_argument("--signals", nargs="+", default=["nll", "nll_lnf", "nll_pmi"])
  ens = sub.add_parser("ensembles", help="single runs and two-run averages of one signal")
  ens.add_argument("runs", nargs="+", help="runs named <mixture>-s<seed>")
  ens.add_argument("--signal", default="nll")
  ens.add_argument("--threshold", default="auto")
  auto = sub.add_parser("auto", help="filter.signal=auto beside nll_nens and nll_tail_nens")
  auto.add_argument("runs", nargs="+", help="runs named <mixture>-s<seed>, or runs with their "
                    "own noisy replicas (the demo's)")
  auto.add_argument("--threshold", default="auto")
  auto.add_argument("--max-drop-fraction", type=float, default=0.6)
  wid = sub.add_parser("widths", help="what data.max_len=auto costs against fixed limits")
  wid.add_argument("mixture", help="a folder with noisy.jsonl and safe.jsonl")
  wid.add_argument("--model", required=True, help="the model whose tokenizer and context count")
  wid.add_argument("--limits", nargs="+", default=["256", "auto"])
  res = sub.add_parser("rescore", help="per-token tables of older runs' saved M1 and M2")
  res.add_argument("runs", nargs="+")
  args = parser.parse_args()
  {"mixtures": cmd_mixtures, "table": cmd_table, "ensembles": cmd_ensembles, "auto": cmd_auto,
   "widths": cmd_widths, "rescore": cmd_rescore}[args.cmd](args)


if __name__ == "__main__":
  main()
