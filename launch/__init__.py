"""The launcher of ff-jax runs (`launch/tpu.py`): Cloud TPU slices through gcloud, and the same
worker command as local processes."""
