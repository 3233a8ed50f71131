#!/bin/bash
# The paper's experiment on SmolLM2-135M-Instruct (docs/experiments.md): for each kind of unsafe
# data (bias, toxicity, harmfulness) one ForgetFilter run with held-out evaluation, then every
# baseline on it, then long-term rounds on the bias run. Every step resumes where it stopped, so
# the script can be killed and rerun; it picks up the signal study's runs (docs/signals.md) when
# they exist. Needs the mixtures of `python scripts/signal_study.py mixtures`.
#
#   scripts/paper_experiment.sh [RUNS_DIR]     (default runs/signal_study)
#
# FROM=filter redoes the filter (and what follows) on runs made with another `filter.signal`,
# as the study's runs were; ROUNDS sets the number of long-term rounds (default 2).
set -euo pipefail
RUNS=${1:-runs/signal_study}
DATA=$RUNS/data
ROUNDS=${ROUNDS:-2}
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }

# kind:replicas (the study's K: 4 on bias, 2 on the others, for CPU time). The filter and the
# finetunes of docs/experiments.md, the defaults then: nll_ens with the automatic threshold, one
# M1; the chat template, Adam β2 0.95, 5 warmup steps and linear decay (docs/fidelity.md).
PINNED="scoring.noisy_replicas=1 filter.signal=nll_ens filter.threshold=auto data.template=chat
  noisy.optim.b2=0.95 noisy.optim.warmup_steps=5 noisy.optim.schedule=linear
  safety.optim.b2=0.95 scoring.pmi=false"
for spec in bias:4 toxicity:2 harmful:2; do
  IFS=: read -r kind replicas <<< "$spec"
  run=$RUNS/$kind-s0
  stamp "$kind: run (filter, clean, evaluate)"
  ff-jax run configs/signals.yaml data.noisy="$DATA/$kind/noisy.jsonl" \
    data.safe="$DATA/$kind/safe.jsonl" data.eval="$DATA/$kind/eval.jsonl" --run-dir "$run" \
    seed=0 scoring.replicas="$replicas" scoring.replicas_per_pass=1 evaluate.toxicity=lexicon \
    $PINNED ${FROM:+--from "$FROM"}
  for baseline in random oracle replay; do
    stamp "$kind: baseline $baseline"
    ff-jax baseline "$baseline" --run-dir "$run"
  done
done
stamp "bias: $ROUNDS long-term rounds"
ff-jax rounds --run-dir "$RUNS/bias-s0" --rounds "$ROUNDS" --heldout
stamp done
