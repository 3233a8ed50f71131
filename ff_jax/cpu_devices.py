"""XLA flags for a CPU host acting as N devices (tests, CI and `launch/tpu.py local`).

No JAX import here: XLA reads `XLA_FLAGS` once, when its CPU backend starts, so these are set in
the environment before that (in a child's environment, or at the top of `tests/conftest.py`).
"""

from __future__ import annotations

# XLA:CPU runs a collective by making every fake device's thread meet at a rendezvous, and aborts
# the whole process (SIGABRT, no Python error) when one thread is more than 40 s late: a CI run of
# the test suite died this way inside a sharded train step on 8 fake devices of a shared 2-core
# machine. Two causes can make a device that late, and each gets its setting:
# - a slow, shared host: the timeout goes to 20 minutes (a real hang still ends);
# - a device's matmul waiting for threads of the intra-op pool that other devices' threads hold
#   while they wait at the rendezvous (a wedge known on XLA:CPU): each fake device computes its
#   ops on its own thread instead. The fake devices already share the cores, so this costs
#   nothing measurable (the packed-step and scan tests: 107.3 s against 109.1 s).
COLLECTIVE_TERMINATE_SECONDS = 1200
COLLECTIVE_WARN_SECONDS = 120


def cpu_device_flags(devices: int) -> str:
  """`XLA_FLAGS` for `devices` fake CPU devices whose collectives tolerate a slow, shared host."""
  return " ".join([
      f"--xla_force_host_platform_device_count={devices}",
      f"--xla_cpu_collective_call_terminate_timeout_seconds={COLLECTIVE_TERMINATE_SECONDS}",
      f"--xla_cpu_collective_call_warn_stuck_timeout_seconds={COLLECTIVE_WARN_SECONDS}",
      f"--xla_cpu_collective_timeout_seconds={COLLECTIVE_TERMINATE_SECONDS}",
      "--xla_cpu_multi_thread_eigen=false",
  ])
