"""The training core: train state and pure jitted train/score steps (`steps`), the step loop with
checkpoints and resume (`loop`), K finetunes stacked on a replica axis (`replicas`), per-example
scoring and generation (`scoring`) and Orbax checkpoints (`checkpoints`)."""
