"""The tiny BLOOM trained by real processes through launch/local.py: same losses as one process,
checkpoints that move between process counts and meshes, and a process killed mid-run."""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

REPO = pathlib.Path(__file__).resolve().parents[2]
LOCAL = REPO / "launch" / "local.py"
TRAIN = ("-m", "bloom_jax.train", "--gin_file=gin_configs/tiny.gin", "--gin.train.log_every=1",
         "--gin.CheckpointOptions.every_steps=2")
STEPS = 4
MESH = {"data": 2, "fsdp": 2, "tensor": 2}
STEP_LINE = re.compile(r"\[p(\d)\] .* step (\d+)/\d+ \| loss ")


def mesh_flags(data: int = 1, fsdp: int = 1, tensor: int = 1) -> list[str]:
  return [f"--gin.create_mesh.{axis}={size}"
          for axis, size in (("data", data), ("fsdp", fsdp), ("tensor", tensor))]


def train_command(model_dir: pathlib.Path, processes: int, devices: int, steps: int,
                  mesh: dict[str, int], launch_flags: tuple[str, ...] = (),
                  gin_flags: tuple[str, ...] = ()) -> list[str]:
  return [sys.executable, str(LOCAL), f"--num_processes={processes}",
          f"--devices_per_process={devices}", *launch_flags, "--", sys.executable, *TRAIN,
          f"--gin.MODEL_DIR={model_dir}", f"--gin.TRAIN_STEPS={steps}", *mesh_flags(**mesh),
          *gin_flags]


def train(model_dir: pathlib.Path, processes: int, devices: int, steps: int = STEPS,
          mesh: dict[str, int] = MESH) -> str:
  """Runs the trainer as `processes` x `devices`; returns the output, prefixed per process."""
  result = subprocess.run(train_command(model_dir, processes, devices, steps, mesh), cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
  return result.stdout


def event_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(model_dir.glob("events.out.tfevents.*"))


def losses(event_file: pathlib.Path) -> dict[int, float]:
  """The loss logged at each step in one TensorBoard event file (float32, not console digits)."""
  reader = event_accumulator.EventAccumulator(str(event_file), size_guidance={"tensors": 0})
  reader.Reload()
  return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in reader.Tensors("loss")}


def run_losses(model_dir: pathlib.Path) -> dict[int, float]:
  """The losses of a run that wrote one event file (only process 0 writes one)."""
  files = event_files(model_dir)
  assert len(files) == 1, files
  return losses(files[0])


def copy_checkpoints(run_dir: pathlib.Path, new_dir: pathlib.Path, up_to_step: int) -> None:
  """A new run directory holding `run_dir`'s checkpoints of steps <= `up_to_step` only."""
  shutil.copytree(run_dir / "checkpoints", new_dir / "checkpoints",
                  ignore=lambda _, names: [n for n in names if n.isdigit() and int(n) > up_to_step])


def assert_same_losses(actual: dict[int, float], expected: dict[int, float], steps) -> None:
  """Equal up to float32 reduction order (meshes and process counts sum in other orders)."""
  np.testing.assert_allclose([actual[s] for s in steps], [expected[s] for s in steps], rtol=2e-6)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[pathlib.Path, str]:
  model_dir = tmp_path_factory.mktemp("two_processes")
  return model_dir, train(model_dir, processes=2, devices=4)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> pathlib.Path:
  model_dir = tmp_path_factory.mktemp("one_process")
  train(model_dir, processes=1, devices=8)
  return model_dir


@pytest.mark.slow
def test_two_processes_log_the_losses_of_one_process_on_the_same_mesh(two_process_run,
                                                                      one_process_run):
  model_dir, output = two_process_run
  expected = run_losses(one_process_run)
  assert sorted(expected) == list(range(1, STEPS + 1))
  assert_same_losses(run_losses(model_dir), expected, range(1, STEPS + 1))
  # Process 0 alone logs metrics and writes config.gin; each process writes its own shards.
  assert {int(m[1]) for m in STEP_LINE.finditer(output)} == {0}
  assert "TRAIN_STEPS = 4" in (model_dir / "config.gin").read_text()
  params = model_dir / "checkpoints" / str(STEPS) / "params"
  assert sorted(p.name for p in params.glob("ocdbt.process_*")) == [
      "ocdbt.process_0", "ocdbt.process_1"]


@pytest.mark.slow
def test_two_process_checkpoint_continues_on_one_process_and_another_mesh(
    two_process_run, tmp_path):
  run_dir, _ = two_process_run
  copy_checkpoints(run_dir, tmp_path, up_to_step=2)
  output = train(tmp_path, processes=1, devices=4, mesh={"fsdp": 4})
  assert "Resumed from step 2" in output
  assert_same_losses(run_losses(tmp_path), run_losses(run_dir), [3, 4])


@pytest.mark.slow
def test_one_process_checkpoint_continues_on_two_processes_and_another_mesh(
    one_process_run, tmp_path):
  copy_checkpoints(one_process_run, tmp_path, up_to_step=2)
  output = train(tmp_path, processes=2, devices=2, mesh={"data": 2, "tensor": 2})
  assert "Resumed from step 2" in output
  assert_same_losses(run_losses(tmp_path), run_losses(one_process_run), [3, 4])


def committed_steps(checkpoints: pathlib.Path) -> list[int]:
  """Steps whose checkpoint orbax committed (a save in progress lives in a temporary name)."""
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def children(pid: int) -> list[int]:
  return [int(child) for task in pathlib.Path(f"/proc/{pid}/task").iterdir()
          for child in (task / "children").read_text().split()]


@pytest.mark.slow
def test_killing_one_process_stops_the_other_and_a_relaunch_resumes(tmp_path):
  # The survivor must stop by itself (a long grace period: not through the launcher's SIGTERM),
  # through gloo's error on the closed connection (then the exit barrier's timeout), or, when it
  # is not reading from the dead process, its missed heartbeats. Both are shortened here.
  launcher = subprocess.Popen(
      train_command(tmp_path, processes=2, devices=4, steps=1000, mesh=MESH,
                    launch_flags=("--grace_s=45",),
                    gin_flags=("--gin.initialize.heartbeat_timeout_s=10",
                               "--gin.initialize.shutdown_timeout_s=10")),
      cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
  output = []
  for line in launcher.stdout:  # Kill process 1 once process 0 logged an odd step >= 5:
    output.append(line)         # the last save due (an even step) is then behind both.
    step = STEP_LINE.match(line)
    if step and int(step[2]) >= 5 and int(step[2]) % 2:
      break
  else:
    pytest.fail(f"the run ended before step 5: {''.join(output)[-5000:]}")
  (process_1,) = [pid for pid in children(launcher.pid)
                  if "JAX_PROCESS_ID=1\0" in pathlib.Path(f"/proc/{pid}/environ").read_text()]
  killed_at = time.monotonic()
  os.kill(process_1, signal.SIGKILL)
  output.extend(launcher.stdout)
  launcher.wait()
  output = "".join(output)
  assert launcher.returncode != 0, output[-5000:]
  assert time.monotonic() - killed_at < 30, output[-5000:]
  assert "[launch] process 1 was killed by SIGKILL; stopping the others" in output
  assert "stopping the remaining processes" not in output  # No escalation was needed.

  resumed = committed_steps(tmp_path / "checkpoints")[-1]
  assert resumed >= 2 and resumed % 2 == 0
  output = train(tmp_path, processes=2, devices=4, steps=resumed + 1)
  assert f"Resumed from step {resumed} " in output
  killed_run, relaunch = (losses(f) for f in event_files(tmp_path))
  assert sorted(relaunch) == [resumed + 1]
  assert_same_losses(relaunch, killed_run, [resumed + 1])
