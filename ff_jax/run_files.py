"""What a run directory holds, in one table: the phases in order, the files each one writes, and
the seed of every finetune.

Everything that reads or writes a run's artifacts (the phases, the experiments, the report) names
them through the constants here, so an artifact has one name and one owner.
"""

from __future__ import annotations

# The phases of a run, in order (ff_jax.pipeline.driver runs them; reports list them this way).
PHASES = ("release", "noisy", "score_before", "safety", "safety_replicas", "noisy_replicas",
          "score_after", "filter", "clean", "evaluate")

MANIFEST = "manifest.json"
TRAINING_LOG = "metrics.jsonl"  # training metrics, streamed by every training phase
TENSORBOARD = "tensorboard"  # tensorboard/<finetune>/ event files of the same records
SCORES_BEFORE = "scores_before.json"
SCORES_AFTER = "scores_after.json"
SCORES_REPLICAS = "scores_replicas.json"
SCORES_NOISY_REPLICAS = "scores_noisy_replicas.json"
# Where ff_jax before issue #28 kept the replica phases' per-pass scores; such a run directory is
# refused (`ensembles.refuse_old_pass_files`): passes now resume from their step checkpoints.
OLD_REPLICA_PASSES = "replicas"
SCORES_CSV = "scores.csv"
# The kept rows, in the input's own format: filtered.<ext> (filtered.jsonl, .jsonl.gz, .csv,
# .parquet, .json) or the folder filtered/ (ff_jax.data.formats); the demo's: filtered.jsonl.
FILTERED = "filtered"
FILTERED_DEMO = "filtered.jsonl"
FLAGGED = "flagged.jsonl"
FILTER_SUMMARY = "filter.json"
CLEAN_HF = "clean_hf"  # the clean model as an HF folder (adapters merged), with its README.md card
CLEAN_ADAPTER = "clean_adapter"  # a LoRA run's adapters alone, as a PEFT folder
METRICS = "metrics.json"
REPORT = "report.md"
PLOTS = "plots"
BASELINES_DIR = "baselines"  # baselines/<name>.json, one per `ff-jax baseline`
BASELINE_NAMES = ("random", "oracle", "replay")  # in the report's order
ROUNDS = "rounds.json"
ROUNDS_REPORT = "rounds.md"

# What each phase leaves in the run directory once it is complete (models under models/).
ARTIFACTS: dict[str, tuple[str, ...]] = {
    "release": ("tokenizer/", "models/base", "models/M0"),  # base: the demo's pretrained model
    "noisy": ("models/M1",),
    "score_before": (SCORES_BEFORE,),
    "safety": ("models/M2", "snapshots/safety/"),
    "safety_replicas": (SCORES_REPLICAS,),
    "noisy_replicas": (SCORES_NOISY_REPLICAS,),
    "score_after": (SCORES_AFTER,),
    "filter": (SCORES_CSV, f"{FILTERED}.<ext> or {FILTERED}/", FLAGGED, FILTER_SUMMARY),
    "clean": ("models/clean", f"{CLEAN_HF}/", f"{CLEAN_ADAPTER}/ (LoRA runs)"),
    "evaluate": (METRICS, REPORT, f"{PLOTS}/"),
}

# Every finetune draws its initialisation, data order and dropout from `cfg.seed * 1000 + offset`,
# so no two finetunes of a run share a data order and a rerun repeats each one exactly.
SEED_OFFSETS = {"release_pretrain": 1, "release_align": 2, "noisy": 3, "safety": 4, "clean": 5,
                "baseline_random": 6, "baseline_oracle": 7, "baseline_replay": 8,
                "safe_subsample": 9}  # data.safe_size: which records of data.safe are used
# Replica i of a finetune (i ≥ 1: the replica phases) adds i times this prime to its seed.
REPLICA_SEED_STRIDE = 1_000_003
# Rounds (`ff-jax rounds`): offset 100 + 10 · round + 2 · method + (1 for the safety stage).
ROUNDS_SEED_BASE = 100


def finetune_seed(run_seed: int, finetune: str, replica: int = 0) -> int:
  """The seed of `finetune` (a key of SEED_OFFSETS) or of its replica `replica`."""
  return run_seed * 1000 + SEED_OFFSETS[finetune] + REPLICA_SEED_STRIDE * replica


def rounds_seed(run_seed: int, round_: int, method_index: int, safety_stage: bool) -> int:
  """The seed of one finetune of `ff-jax rounds` (each method, round and stage its own order)."""
  return run_seed * 1000 + ROUNDS_SEED_BASE + 10 * round_ + 2 * method_index + int(safety_stage)
