"""ff_jax: ForgetFilter in JAX/Flax NNX.

Finetune an aligned model on noisy customer data, finetune briefly on a small safe set, and drop
the examples that are forgotten most; then finetune the original model on what remains. The
entry point is the `ff-jax` command (`ff_jax.cli`); `ff_jax.pipeline.driver` runs the phases.
"""

__version__ = "0.1.0"
