"""XLA flags for a CPU host acting as N devices (tests, CI and `launch/tpu.py local`).

No JAX import here: XLA reads `XLA_FLAGS` once, when its CPU backend starts, so these are set in
the environment before that (in a child's environment, or at the top of `tests/conftest.py`).
"""

from __future__ import annotations

# XLA:CPU runs a collective by making every fake device's thread meet at a rendezvous, and aborts
# the whole process (SIGABRT, no Python error) when one thread is more than 40 s late. On a shared
# 2-core machine 8 fake devices can be that late behind other work: a CI run of the test suite died
# this way inside a sharded train step. A real deadlock still ends, after 20 minutes.
COLLECTIVE_TERMINATE_SECONDS = 1200
COLLECTIVE_WARN_SECONDS = 120


def cpu_device_flags(devices: int) -> str:
  """`XLA_FLAGS` for `devices` fake CPU devices whose collectives tolerate a slow, shared host."""
  return " ".join([
      f"--xla_force_host_platform_device_count={devices}",
      f"--xla_cpu_collective_call_terminate_timeout_seconds={COLLECTIVE_TERMINATE_SECONDS}",
      f"--xla_cpu_collective_call_warn_stuck_timeout_seconds={COLLECTIVE_WARN_SECONDS}",
      f"--xla_cpu_collective_timeout_seconds={COLLECTIVE_TERMINATE_SECONDS}",
  ])
