"""Multi-process start-up: `jax.distributed` from gin, the JAX_* environment or the cluster.

Each field of the process group is taken from the first source that sets it:
  1. an explicit argument (a gin binding such as `initialize.num_processes = 2`),
  2. the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID,
     JAX_LOCAL_DEVICE_IDS (what `launch/local.py` sets),
  3. jax's own cluster detection (SLURM under `srun`, Open MPI, Kubernetes, Cloud TPU); under
     SLURM the coordinator is the first node of the step on a port derived from the job id,
     or on JAX_COORDINATOR_PORT when set.
A run with one process (or none of the above) needs nothing and starts nothing.

Under SLURM jax restricts each process to the GPU numbered SLURM_LOCALID, which suits one
task per GPU; with one task per node set JAX_LOCAL_DEVICE_IDS=0,...,7 (the sbatch scripts do).
"""

from collections.abc import Sequence
import atexit
import dataclasses
import logging
import os
import signal
import sys
import threading
import time

import gin
import jax
from jax._src import clusters  # jax's cluster detection, reused as is (jax is pinned).
from jax._src import distributed as jax_distributed  # its client: the key-value store
from jax.experimental import multihost_utils

_ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"
_ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"

# Set by SIGTERM in a single-process run (a multi-process run has jax's preemption service).
_sigterm_received = threading.Event()


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """Where this process stands among the processes of one run."""

    coordinator_address: str | None  # "host:port" of process 0; None for a single process.
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None  # None: every local device is visible.

    @property
    def is_multi_process(self) -> bool:
        return self.num_processes > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"{name}={value!r} is not an integer; set it to one or unset it.") from None


def _env_int_list(name: str) -> list[int] | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise ValueError(
            f"{name}={value!r} is not a comma-separated list of device ids such as '0,1,2,3'."
        ) from None


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> ProcessGroup:
    """Resolves the process group from arguments, then JAX_* variables, then the cluster."""
    coordinator_address = coordinator_address or os.environ.get(_ENV_COORDINATOR_ADDRESS) or None
    num_processes = num_processes if num_processes is not None else _env_int(_ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(_ENV_PROCESS_ID)
    if local_device_ids is None:
        local_device_ids = _env_int_list(_ENV_LOCAL_DEVICE_IDS)

    if None in (coordinator_address, num_processes, process_id, local_device_ids):
        coordinator_address, num_processes, process_id, local_device_ids = (
            clusters.ClusterEnv.auto_detect_unset_distributed_params(
                coordinator_address,
                num_processes,
                process_id,
                local_device_ids,
                cluster_detection_method=None,
                initialization_timeout=None,
            )
        )

    if num_processes is None or num_processes == 1:
        if num_processes is None and (coordinator_address is not None or process_id is not None):
            raise ValueError(
                "A coordinator address or process id is set but the number of processes is "
                f"unknown: set {_ENV_NUM_PROCESSES} or bind initialize.num_processes (or unset "
                f"{_ENV_COORDINATOR_ADDRESS} / {_ENV_PROCESS_ID} for a single-process run)."
            )
        return ProcessGroup(None, 1, 0, None)

    unset = [name for name, value in ((_ENV_COORDINATOR_ADDRESS, coordinator_address),
                                      (_ENV_PROCESS_ID, process_id)) if value is None]
    if unset:
        raise ValueError(
            f"A run of {num_processes} processes needs {' and '.join(unset)} (or the matching "
            "initialize.* gin binding); set them, or launch under srun so that SLURM provides them."
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"Process id {process_id} is outside [0, {num_processes}): every process needs a "
            "distinct id below the number of processes."
        )
    return ProcessGroup(
        coordinator_address,
        num_processes,
        process_id,
        tuple(local_device_ids) if local_device_ids is not None else None,
    )


def _request_stop(signum, frame):
    """Single-process SIGTERM / first Ctrl-C: checkpoint and stop at the next step boundary."""
    del frame
    logging.warning("Received %s: the run saves a checkpoint and stops after this step "
                    "(Ctrl-C again to abort without saving).", signal.Signals(signum).name)
    _sigterm_received.set()
    signal.signal(signal.SIGINT, signal.default_int_handler)


@gin.configurable
def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout_s: int = 300,
    heartbeat_timeout_s: int = 50,  # a hung host is declared dead within a minute
    shutdown_timeout_s: int = 60,
    cpu_collectives: str = "gloo",
) -> ProcessGroup:
    """Joins this process to its run with `jax.distributed.initialize`; call before any jax use.

    Fails with an error instead of hanging: the connection to the coordinator is given up after
    `initialization_timeout_s`; a process that stops answering (dead, or hung) for half of
    `heartbeat_timeout_s` ends every other one with an `error:` line naming it (`PeerWatch`),
    before jax's own heartbeat timeout would abort them with a C++ stack trace; and the exit
    barrier, where a process that failed waits for the others, ends after `shutdown_timeout_s`.
    `cpu_collectives` ("gloo" or "mpi") carries cross-process collectives between CPU devices.
    SIGTERM is caught from then on, in one process as in many: poll `reached_preemption`.

    Gin bindings (all optional): initialize.coordinator_address = "node001:7777",
    initialize.num_processes, initialize.process_id, initialize.local_device_ids = [0, 1],
    initialize.initialization_timeout_s, initialize.heartbeat_timeout_s,
    initialize.shutdown_timeout_s, initialize.cpu_collectives.
    """
    group = resolve(coordinator_address, num_processes, process_id, local_device_ids)
    if not group.is_multi_process:
        signal.signal(signal.SIGTERM, _request_stop)
        signal.signal(signal.SIGINT, _request_stop)
        return group
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    logging.info(
        "Joining a run of %d processes as process %d (coordinator %s).",
        group.num_processes, group.process_id, group.coordinator_address,
    )
    jax.distributed.initialize(
        coordinator_address=group.coordinator_address,
        num_processes=group.num_processes,
        process_id=group.process_id,
        local_device_ids=group.local_device_ids,
        cluster_detection_method="deactivate",  # Already resolved above.
        initialization_timeout=initialization_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        shutdown_timeout_seconds=shutdown_timeout_s,
    )
    PeerWatch(group, timeout_s=heartbeat_timeout_s / 2)
    return group


class PeerFailed(RuntimeError):
    """Another process of the run died or stopped answering."""


EXIT_PEER_FAILED = 1


class PeerWatch:
    """A thread that beats for this process in jax's key-value store (on the coordinator) and
    watches the other processes' beats: one that has not beaten for `timeout_s`, or a lost
    coordinator, ends this process at once with one `error:` line, whatever the main thread is
    blocked in (a collective with the dead process, a save). It stops at exit, before jax's
    exit barrier, so a process that ends (normally or not) soon stops beating."""

    KEY = "bloom_jax/beat/"

    def __init__(self, group: ProcessGroup, timeout_s: float):
        self._group, self._timeout_s = group, timeout_s
        self._client = jax_distributed.global_state.client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bloom_jax peer watch",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.stop)  # runs before jax's shutdown (registered earlier)

    def stop(self) -> None:
        """Stops the beats and waits for the thread's last call to the store to return: a
        daemon thread still inside that call when Python finalizes is unwound through C++
        frames that do not allow it, and the process aborts (SIGABRT) at a clean exit."""
        self._stop.set()
        self._thread.join(timeout=self._timeout_s)

    def _watch(self) -> None:
        me, beat, last_change = self._group.process_id, 0, {}  # peer -> (its beat, since when)
        while not self._stop.wait(min(1.0, self._timeout_s / 5)):
            beat += 1
            try:
                self._client.key_value_set(f"{self.KEY}{me}", str(beat), allow_overwrite=True)
                beats = dict(self._client.key_value_dir_get(self.KEY))
            except Exception as error:  # pylint: disable=broad-except  # any RPC failure
                if not self._stop.is_set():
                    _exit_peer_failed(
                        f"the run's coordinator (process 0, {self._group.coordinator_address}) "
                        f"does not answer ({str(error).splitlines()[0]}): it died or hangs")
                return
            now = time.monotonic()
            for peer in set(range(self._group.num_processes)) - {me}:
                seen = beats.get(f"{self.KEY}{peer}")
                if peer not in last_change or last_change[peer][0] != seen:
                    last_change[peer] = (seen, now)
                elif now - last_change[peer][1] > self._timeout_s and not self._stop.is_set():
                    _exit_peer_failed(f"process {peer} of {self._group.num_processes} has not "
                                      f"answered for {self._timeout_s:.0f} s: it died or hangs")


def _exit_peer_failed(problem: str) -> None:
    """Ends this process with one line (its other threads may be blocked for good)."""
    sys.stderr.write(f"error: {problem}. This process stops too; relaunch the run to resume "
                     "from its last checkpoint.\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(EXIT_PEER_FAILED)


def reached_preemption(step: int) -> bool:
    """Whether to checkpoint and exit at `step` because SIGTERM arrived (preemption, time limit).

    Call it at every step on every process. With several processes, jax's preemption service
    (which catches SIGTERM once `initialize` ran) makes every process answer True at the same
    step; a single process answers True from its first call after the signal. Do not install
    another SIGTERM handler after `initialize`: it would replace this one.
    """
    if jax.distributed.is_initialized():
        return multihost_utils.reached_preemption_sync_point(step)
    return _sigterm_received.is_set()
