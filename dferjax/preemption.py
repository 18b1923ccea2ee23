"""A scheduler's notice to stop becomes a checkpoint at the next step and an exit the same command resumes from.

The notice is SIGTERM: SLURM's preemption or time limit (with `--signal`), `scancel`, Kubernetes deleting a pod, a
spot VM's shutdown. Its default action would end the run at once, losing the steps since the last checkpoint (an
epoch's by default). One process: a SIGTERM handler notes the notice and the trainer saves after the step it is
in. Several (`jax.distributed`): JAX's preemption service hears the notice on any process and names one step at
which all of them save (`multihost_utils.reached_preemption_sync_point`), so every process writes the same step.
"""
from __future__ import annotations

import os
import signal
import threading

# 128 + the signal: what a shell reports for a process the signal ended, so a scheduler sees the run as stopped,
# not finished (a Kubernetes Job restarts it; `sbatch --requeue` requeues it either way).
EXIT_STATUS = 128 + signal.SIGTERM


class Preempted(Exception):
  """Raised once the notice's checkpoint is saved; the command line says where and exits EXIT_STATUS."""

  def __init__(self, step: int):
    super().__init__(f'stopped by SIGTERM after saving step {step}')
    self.step = step


class Notice:
  """Context manager that watches for SIGTERM while a run trains; `reached(step)` after each step says whether to
  save now and stop. Outside the main thread (a library caller's worker thread) no handler can be set: a notice
  then ends the process as it would without one."""

  def __init__(self):
    self._received = False
    self._installed, self._previous = False, None
    self._synchronised = False  # several processes: JAX's preemption service decides

  def __enter__(self) -> Notice:
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() > 1:
      self._synchronised = jax.config.jax_enable_preemption_service
      if not self._synchronised:
        print('note: jax_enable_preemption_service is off, so a SIGTERM to this multi-process run is not turned '
              'into a checkpoint', flush=True)
    elif threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._installed = True
    return self

  def __exit__(self, *exc_info) -> None:
    if self._installed:  # None: the previous handler was not set from Python; the default then
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    if not self._received:  # os.write: print is not safe inside a signal handler
      os.write(2, b'\nSIGTERM: saving a checkpoint after this step, then stopping\n')
    self._received = True

  def begin(self, step: int) -> None:
    """The step the run starts from, as early as it is known. JAX's protocol saves at the step after the furthest
    process's last reported one, and a process reports 0 until it first calls: a notice before the first step of a
    resumed run would name a step already past."""
    if self._synchronised:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.reached_preemption_sync_point(step)

  def all_saved(self) -> None:
    """With several processes: waits until every process has its part of the notice's checkpoint written, so that
    none exits before (SLURM's --kill-on-bad-exit ends the others when the first exits 143)."""
    if self._synchronised:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices('dferjax: the preemption checkpoint is saved')

  def reached(self, step: int) -> bool:
    """Whether the run saves at `step` and stops. With several processes every one calls this at every step, and it
    answers True on all of them at the same step (JAX's protocol)."""
    if self._synchronised:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      if multihost_utils.reached_preemption_sync_point(step):
        print(f'a process of this run got SIGTERM: every process saves step {step}, then stops', flush=True)
        return True
      return False
    return self._received
