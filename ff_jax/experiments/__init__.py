"""Experiments on a finished run, built on the pipeline: the paper's baselines (`baselines`),
interleaved long-term safety rounds (`rounds`) and ablation sweeps (`sweep`)."""
