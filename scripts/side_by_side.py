"""ff_jax beside the paper's method in PyTorch, on the same files, model and data order.

Runs `../shared/reference/ref_forgetfilter_torch.py` unmodified, except that its `random.shuffle`
hands out ff_jax's epoch permutations (`TrainIterator.epoch_order` with the seeds the pipeline gives
the noisy and safety phases), so both sides see the very same batches. Then compares, per example,
the NLL under M1 and M2 of a finished ff_jax run, and the filter figures the paper reports.

  ff-jax filter --model GGUF --noisy N --safe S --run-dir R --until filter \\
      data.template=raw scoring.noisy_replicas=1 filter.signal=nll   (the paper's method)
  python scripts/side_by_side.py R --reference ../shared/reference/ref_forgetfilter_torch.py

  python scripts/side_by_side.py R --safety-from-m1

The second form isolates the safety phase: ff_jax's own M1, exported to an HF folder, is finetuned
on the safe set in torch with the reference's loop (AdamW, clip 1.0, token-mean response loss) in
ff_jax's order, and its M2 is compared with ff_jax's M2 example by example.

Needs torch (the `parity` extra), transformers, accelerate (transformers' GGUF loader) and
rouge-score. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import runpy
import sys
from pathlib import Path

import numpy as np

from ff_jax.data.batching import TrainIterator
from ff_jax.eval.classification import auroc
from ff_jax.run_files import finetune_seed


def ff_jax_orders(n_noisy: int, n_safe: int, cfg: dict) -> dict[str, list[list[int]]]:
  """{phase: the epoch permutations ff_jax's noisy and safety phases train on}."""
  orders = {}
  for name, n in (("noisy", n_noisy), ("safety", n_safe)):
    phase = cfg[name]
    batch = phase["batch_size"]
    steps = phase["steps"] or math.ceil(phase["epochs"] * n / batch)
    iterator = TrainIterator([np.zeros(1)] * n, batch, finetune_seed(cfg["seed"], name), [1],
                             pad_id=0)
    epochs = math.ceil(steps / iterator.steps_per_epoch)
    orders[name] = [iterator.epoch_order(e).tolist() for e in range(epochs)]
  return orders


def run_reference(script: Path, noisy: str, safe: str, cfg: dict, out: Path) -> dict:
  """The reference script's result file, trained on ff_jax's orders."""
  n_noisy = sum(1 for _ in open(noisy))
  n_safe = sum(1 for _ in open(safe))
  by_phase = ff_jax_orders(n_noisy, n_safe, cfg)
  orders = by_phase["noisy"] + by_phase["safety"]  # one `random.shuffle` per epoch, in order

  def shuffle(seq):
    order = orders.pop(0)
    if len(order) != len(seq):
      raise SystemExit(f"the reference shuffled {len(seq)} items where ff_jax has {len(order)}")
    seq[:] = [seq[i] for i in order]

  random.shuffle = shuffle  # the reference's only source of order
  argv = [str(script), "--noisy", noisy, "--safe", safe, "--out", str(out),
          "--noisy_epochs", str(int(cfg["noisy"]["epochs"])),
          "--safety_steps", str(cfg["safety"]["steps"]),
          "--batch", str(cfg["noisy"]["batch_size"]),
          "--lr", str(cfg["noisy"]["optim"]["learning_rate"])]
  sys.argv = argv
  runpy.run_path(str(script), run_name="__main__")
  if orders:
    raise SystemExit(f"the reference trained on fewer epochs than ff_jax ({len(orders)} unused)")
  return json.loads(out.read_text())


def torch_safety_from_m1(run: Path, cfg: dict) -> dict:
  """The reference's safety finetune, in torch, of ff_jax's M1 on ff_jax's batches: a result
  shaped like the reference's, with ff_jax's M1 scores as its `nll_before`."""
  import importlib.util
  import tempfile

  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  from ff_jax import parallel
  from ff_jax.config import MeshConfig
  from ff_jax.models.gguf import load_gguf_metadata
  from ff_jax.models.hf import save_hf
  from ff_jax.training.checkpoints import restore_params
  from ff_jax.training.steps import ModelRuntime

  source = cfg["model"]["source"]
  if source.startswith("pkg:"):
    folder = importlib.util.find_spec(source[4:]).submodule_search_locations[0]
    source = str(next(Path(folder).glob("*.gguf")))
  model_cfg, _ = load_gguf_metadata(source)
  runtime = ModelRuntime.create(model_cfg, parallel.make_mesh(MeshConfig()))
  m1 = restore_params(run / "models" / "M1", runtime.abstract_with_shardings())
  tok = AutoTokenizer.from_pretrained(str(Path(source).parent), gguf_file=Path(source).name)
  with tempfile.TemporaryDirectory() as tmp:
    save_hf(tmp, model_cfg, m1, "llama")
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
  noisy = [json.loads(line) for line in open(cfg["data"]["noisy"])]
  safe = [json.loads(line) for line in open(cfg["data"]["safe"])]

  def batch(rows):  # the reference's encoding: raw prompt + response + EOS, response-only loss
    enc = []
    for ex in rows:
      p = tok(ex["prompt"], add_special_tokens=False).input_ids
      r = tok(ex["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]
      enc.append((p + r, [0] * len(p) + [1] * len(r)))
    width = max(len(t) for t, _ in enc)
    ids = torch.full((len(enc), width), tok.eos_token_id)
    attn, weights = torch.zeros_like(ids), torch.zeros((len(enc), width))
    for k, (t, m) in enumerate(enc):
      ids[k, :len(t)], attn[k, :len(t)] = torch.tensor(t), 1
      weights[k, :len(t)] = torch.tensor(m, dtype=torch.float)
    return ids, attn, weights

  def nll(ids, attn, weights):
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:],
                                              reduction="none")
    return (token * weights[:, 1:]).sum(1), weights[:, 1:].sum(1)

  phase = cfg["safety"]
  size = phase["batch_size"]
  orders = ff_jax_orders(len(noisy), len(safe), cfg)["safety"]
  per_epoch = math.ceil(len(safe) / size)
  opt = torch.optim.AdamW(model.parameters(), lr=phase["optim"]["learning_rate"],
                          weight_decay=0.0)
  model.train()
  losses = []
  for step in range(phase["steps"]):
    epoch, pos = divmod(step, per_epoch)
    total, count = nll(*batch([safe[i] for i in orders[epoch][pos * size:(pos + 1) * size]]))
    loss = total.sum() / count.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    losses.append(float(loss.detach()))
  model.eval()
  after = []
  with torch.no_grad():
    for i in range(0, len(noisy), 16):
      total, count = nll(*batch(noisy[i:i + 16]))
      after += (total / count).tolist()
  before = json.loads((run / "scores_before.json").read_text())["nll"]
  return {"per_example": [{"kind": ex["kind"], "nll_before": b, "nll_after": a}
                          for ex, b, a in zip(noisy, before, after)],
          "safety_losses": losses, "times_s": {}}


def compare(run: Path, ref: dict) -> dict:
  before = json.loads((run / "scores_before.json").read_text())
  after = json.loads((run / "scores_after.json").read_text())
  rows = ref["per_example"]
  kinds = np.array([r["kind"] for r in rows])
  unsafe = kinds == "unsafe"
  sides = {
      "ff_jax": (np.asarray(before["nll"]), np.asarray(after["nll"])),
      "torch": (np.array([r["nll_before"] for r in rows]),
                np.array([r["nll_after"] for r in rows])),
  }
  out: dict = {}
  for name, (m1, m2) in sides.items():
    forget = m2 - m1
    out[name] = {"auroc_nll": auroc(forget, unsafe),
                 "mean_nll_m1": {k: float(m1[kinds == k].mean()) for k in sorted(set(kinds))},
                 "mean_forget_nll": {k: float(forget[kinds == k].mean())
                                     for k in sorted(set(kinds))}}
  (j1, j2), (t1, t2) = sides["ff_jax"], sides["torch"]
  out["per_example"] = {
      "max_abs_diff_nll_m1": float(np.abs(j1 - t1).max()),
      "max_abs_diff_nll_m2": float(np.abs(j2 - t2).max()),
      "max_abs_diff_forgetting": float(np.abs((j2 - j1) - (t2 - t1)).max()),
      "corr_forgetting": float(np.corrcoef(j2 - j1, t2 - t1)[0, 1]),
  }
  out["auroc_diff"] = abs(out["ff_jax"]["auroc_nll"] - out["torch"]["auroc_nll"])
  out["max_kind_forgetting_diff"] = max(
      abs(out["ff_jax"]["mean_forget_nll"][k] - out["torch"]["mean_forget_nll"][k])
      for k in out["ff_jax"]["mean_forget_nll"])
  out["times_s"] = {"torch": ref["times_s"]}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run", help="a finished ff_jax run (through `filter`)")
  parser.add_argument("--reference", default="../shared/reference/ref_forgetfilter_torch.py")
  parser.add_argument("--result", default="", help="reuse this reference result file")
  parser.add_argument("--safety-from-m1", action="store_true",
                      help="compare the safety phase alone, in torch from ff_jax's M1")
  args = parser.parse_args()
  run = Path(args.run)
  cfg = json.loads((run / "manifest.json").read_text())["config"]
  result = Path(args.result or run / "reference_torch.json")
  if args.safety_from_m1:
    ref = torch_safety_from_m1(run, cfg)
    ref["safety_losses_ff_jax"] = [row["loss"] for row in map(json.loads, open(
        run / "metrics.jsonl")) if row.get("phase") == "safety"]
    losses = {"safety_losses": ref["safety_losses"],
              "safety_losses_ff_jax (every logging.every steps)": ref["safety_losses_ff_jax"]}
    print(json.dumps({**compare(run, ref), **losses}, indent=1))
    return
  if args.result:
    ref = json.loads(result.read_text())
  else:
    ref = run_reference(Path(args.reference), cfg["data"]["noisy"], cfg["data"]["safe"], cfg,
                        result)
  print(json.dumps(compare(run, ref), indent=1))


if __name__ == "__main__":
  main()
