"""Resolution of the process group from arguments, JAX_* variables and SLURM; start-up timeout;
the peer watch's stop at exit."""

import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import gin
import jax
import pytest
from jax._src import distributed as jax_distributed

from bloom_jax import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
SLURM_TASK = {  # What `srun` sets for task 7 of a 48-node step, one task per node.
    "SLURM_JOB_ID": "12345",
    "SLURM_STEP_NODELIST": "gpu[003-050]",
    "SLURM_NTASKS": "48",
    "SLURM_PROCID": "7",
    "SLURM_LOCALID": "0",
}
SLURM_PORT = 65535 - 2**12 + 1 + 12345 % 2**12  # jax derives the port from the job id.


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No launcher variables from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "KUBERNETES_", "JAX_COORDINATOR",
                            "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS")):
            monkeypatch.delenv(name)


def run_python(snippet: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True,
                          text=True, timeout=60)


def set_env(monkeypatch, values):
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_nothing_set_is_a_single_process():
    assert distributed.resolve() == distributed.ProcessGroup(None, 1, 0, None)


def test_jax_variables(monkeypatch):
    set_env(monkeypatch, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                          "JAX_PROCESS_ID": "3", "JAX_LOCAL_DEVICE_IDS": "0,1"})
    assert distributed.resolve() == distributed.ProcessGroup("10.0.0.1:1234", 4, 3, (0, 1))


def test_slurm_variables(monkeypatch):
    set_env(monkeypatch, SLURM_TASK)
    assert distributed.resolve() == distributed.ProcessGroup(f"gpu003:{SLURM_PORT}", 48, 7, (0,))


def test_slurm_one_task_per_node_with_all_its_gpus(monkeypatch):
    set_env(monkeypatch, {**SLURM_TASK, "JAX_COORDINATOR_PORT": "7777",
                          "JAX_LOCAL_DEVICE_IDS": "0,1,2,3,4,5,6,7"})
    assert distributed.resolve() == distributed.ProcessGroup("gpu003:7777", 48, 7, tuple(range(8)))


def test_arguments_before_variables_before_slurm(monkeypatch):
    set_env(monkeypatch, {**SLURM_TASK, "JAX_PROCESS_ID": "5", "JAX_NUM_PROCESSES": "16"})
    group = distributed.resolve(coordinator_address="head:99", num_processes=8)
    assert group == distributed.ProcessGroup("head:99", 8, 5, (0,))


def test_slurm_single_task_is_a_single_process(monkeypatch):
    set_env(monkeypatch, {**SLURM_TASK, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert not distributed.resolve().is_multi_process


@pytest.mark.parametrize("env,message", [
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer"),
    ({"JAX_LOCAL_DEVICE_IDS": "0;1"}, "JAX_LOCAL_DEVICE_IDS='0;1' is not a comma-separated"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "needs JAX_COORDINATOR_ADDRESS"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1"}, "needs JAX_PROCESS_ID"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "2"},
     r"Process id 2 is outside \[0, 2\)"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "the number of processes is unknown"),
])
def test_bad_settings_are_clear_errors(monkeypatch, env, message):
    set_env(monkeypatch, env)
    with pytest.raises(ValueError, match=message):
        distributed.resolve()


def test_single_process_initialize_starts_nothing():
    assert distributed.initialize() == distributed.ProcessGroup(None, 1, 0, None)
    assert not jax.distributed.is_initialized()


def test_gin_binds_initialize():
    with gin.unlock_config():
        gin.parse_config(["initialize.num_processes = 2", "initialize.process_id = 5",
                          "initialize.coordinator_address = 'h:1'"])
    with pytest.raises(ValueError, match=r"Process id 5 is outside \[0, 2\)"):
        distributed.initialize()


@pytest.mark.slow
def test_unreachable_coordinator_fails_within_the_timeout():
    with socket.socket() as s:  # A port nobody listens on.
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    snippet = ("from bloom_jax import distributed; "
               "distributed.initialize(initialization_timeout_s=2); print('connected')")
    start = time.monotonic()
    result = run_python(snippet, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                        JAX_PROCESS_ID="1")
    assert time.monotonic() - start < 30
    assert result.returncode != 0
    assert "connected" not in result.stdout
    assert "DEADLINE_EXCEEDED" in result.stderr


@pytest.mark.slow
def test_single_process_sigterm_is_a_preemption_not_a_kill():
    snippet = ("import os, signal; from bloom_jax import distributed; distributed.initialize(); "
               "print(distributed.reached_preemption(0)); os.kill(os.getpid(), signal.SIGTERM); "
               "print(distributed.reached_preemption(1))")
    result = run_python(snippet)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]


class SlowStore:
    """jax's key-value store client, with a directory read that takes `seconds` to answer."""

    def __init__(self, seconds: float):
        self.seconds, self.reading = seconds, threading.Event()

    def key_value_set(self, key, value, allow_overwrite=False):
        del key, value, allow_overwrite

    def key_value_dir_get(self, key):
        del key
        self.reading.set()
        time.sleep(self.seconds)
        return []


def test_peer_watch_stops_only_after_its_call_to_the_store_returns(monkeypatch):
    """What the watch does at exit: a daemon thread still inside a store call when Python
    finalizes is unwound through C++ and aborts the process (the preemption test's process 1
    died of SIGABRT in 10 of 60 launches on a loaded machine while it did not wait)."""
    store = SlowStore(seconds=0.5)
    monkeypatch.setattr(jax_distributed.global_state, "client", store)
    watch = distributed.PeerWatch(distributed.ProcessGroup("127.0.0.1:1", 2, 0, None), timeout_s=5)
    assert store.reading.wait(timeout=10)
    watch.stop()
    assert "bloom_jax peer watch" not in [thread.name for thread in threading.enumerate()]
