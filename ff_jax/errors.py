"""User-facing errors: one clear message naming the file, line or key; no deep JAX traceback.

The CLI catches `FFJaxError` and prints its message alone, so every error a user can cause by a
config, a data file or a checkpoint should be raised as one of these subclasses.
"""


class FFJaxError(Exception):
  """Base class for errors caused by user input rather than by a bug in ff_jax."""


class ConfigError(FFJaxError):
  """A bad configuration key or value."""


class DataError(FFJaxError):
  """A malformed or inconsistent data file (names the file and, where known, the line)."""


class CheckpointError(FFJaxError):
  """A model checkpoint that is missing tensors, has wrong shapes or an unknown architecture."""


class MeshError(FFJaxError):
  """A device mesh that cannot be built on the available devices."""


class RunDirError(FFJaxError):
  """A run directory that holds another run's config or data."""


class NoSeparationError(FFJaxError):
  """The filter's scores show no two groups and `filter.on_no_separation` is `refuse`."""
