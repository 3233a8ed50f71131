"""`data.max_len: auto` and `data.buckets: auto` (ff_jax.data.widths)."""

import pytest

from ff_jax.config import load_config
from ff_jax.data.widths import bucket_ladder, resolve_widths
from ff_jax.errors import ConfigError


def test_ladder_ends_at_the_width():
  assert bucket_ladder(512) == (64, 128, 256, 512)
  assert bucket_ladder(300) == (64, 128, 256, 300)
  assert bucket_ladder(64) == (64,)


@pytest.mark.parametrize("max_len, buckets, longest, context, expected", [
    ("auto", "auto", 421, 8192, (512, (64, 128, 256, 512))),  # the longest row's bucket
    ("auto", "auto", 40, 8192, (64, (64,))),
    ("auto", "auto", 9000, 8192, (8192, (64, 128, 256, 512, 1024, 2048, 4096, 8192))),  # context
    ("auto", "auto", 200, 128, (128, (64, 128))),
    (256, "auto", 999, 8192, (256, (64, 128, 256))),  # a number the user set stays, and cuts
    ("auto", (64, 128, 256), 100, 8192, (128, (64, 128, 256))),  # the user's bucket that holds it
    ("auto", (64, 128), 300, 8192, (512, (64, 128, 512))),  # a list gets the width it lacks
    (96, (32, 64, 96), 500, 8192, (96, (32, 64, 96))),  # the demo's preset: unchanged
])
def test_resolve(max_len, buckets, longest, context, expected):
  assert resolve_widths(max_len, buckets, longest, context) == expected


@pytest.mark.parametrize("override, message", [
    ("data.max_len=wide", "set auto"), ("data.max_len=1", "at least 2"),
    ("data.buckets=some", "set auto or a list"), ("data.buckets=[]", "at least one")])
def test_bad_settings_are_refused_when_the_config_loads(override, message):
  with pytest.raises(ConfigError, match=message):
    load_config(None, [override])
