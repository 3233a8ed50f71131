"""The training core: train state and pure jitted train/score steps for one model or K stacked
replicas (`steps`), the one step loop, checkpointed or in memory (`loop`), the replica mesh and
stacked batches (`replicas`), per-example scoring and generation (`scoring`) and Orbax checkpoints
(`checkpoints`)."""
