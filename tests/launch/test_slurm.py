"""The sbatch scripts, run by bash against fake `srun` / `scontrol` that record each task's
command."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "launch" / "slurm"
FAKE_BIN = pathlib.Path(__file__).resolve().parent / "fake_slurm"
SCRIPTS = ["bloom176b.sbatch", "bloom560m.sbatch"]
JOB_ID = 4242


def sbatch_directives(script: pathlib.Path) -> dict[str, str]:
    """The `#SBATCH --key=value` lines of a script."""
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", script.read_text(), re.MULTILINE))


def slurm_env(script: pathlib.Path, model_dir: pathlib.Path,
              record: pathlib.Path) -> dict[str, str]:
    """The environment SLURM gives the batch script of `script`, with the fakes first on PATH."""
    directives = sbatch_directives(script)
    nodes = int(directives["nodes"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "XLA_"))}
    env.update(
        PATH=os.pathsep.join([str(FAKE_BIN), os.path.dirname(sys.executable), env["PATH"]]),
        PYTHONPATH=str(REPO),
        JAX_PLATFORMS="cpu",
        MODEL_DIR=str(model_dir),
        FAKE_SLURM_RECORD=str(record),
        SLURM_JOB_ID=str(JOB_ID),
        SLURM_JOB_NAME=directives["job-name"],
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_JOB_NODELIST=f"gpu[{101:03d}-{100 + nodes:03d}]" if nodes > 1 else "gpu101",
        SLURM_GPUS_ON_NODE=directives["gpus-per-node"],
        SLURM_SUBMIT_DIR=str(REPO),
    )
    return env


def read_records(record: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


@pytest.mark.parametrize("name", SCRIPTS + ["common.sh", "prepare.sbatch"])
def test_scripts_parse(name):
    subprocess.run(["bash", "-n", str(SLURM_DIR / name)], check=True)


@pytest.mark.parametrize("name,nodes,gin_file", [
    ("bloom176b.sbatch", 48, "gin_configs/bloom176b.gin"),
    ("bloom560m.sbatch", 1, "gin_configs/bloom560m.gin"),
])
def test_every_node_runs_the_trainer_as_its_own_process(tmp_path, name, nodes, gin_file):
    script = SLURM_DIR / name
    directives = sbatch_directives(script)
    assert directives["ntasks-per-node"] == "1" and directives["gpus-per-node"] == "8"
    assert "requeue" in directives and directives["signal"].startswith("B:USR1@")
    record = tmp_path / "record.jsonl"
    model_dir = tmp_path / "run"
    result = subprocess.run(["bash", str(script)], env=slurm_env(script, model_dir, record),
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

    tasks = [r for r in read_records(record) if r["tool"] == "srun"]
    assert len(tasks) == nodes
    coordinator_port = 65535 - 2**12 + 1 + JOB_ID % 2**12  # jax's SLURM port rule.
    for process_id, task in enumerate(tasks):
        assert task["command"] == [
            "python", "-m", "bloom_jax.train", f"--gin_file={gin_file}",
            f'--gin.MODEL_DIR="{model_dir}"',
        ]
        assert task["group"] == {
            "coordinator_address": f"gpu101:{coordinator_port}" if nodes > 1 else None,
            "num_processes": nodes,
            "process_id": process_id if nodes > 1 else 0,
            "local_device_ids": list(range(8)) if nodes > 1 else None,
        }
        assert task["options"]["kill-on-bad-exit"] == "1"
        assert task["options"]["output"] == f"{model_dir}/logs/{JOB_ID}.0/node%n-%N.log"
    assert (model_dir / "logs" / f"{JOB_ID}.0").is_dir()
    assert not [r for r in read_records(record) if r["tool"] == "scontrol"]


@pytest.mark.slow
def test_xla_flags_are_known_to_the_installed_xla(tmp_path):
    """XLA aborts on an unknown flag, so a renamed or misspelled one fails here, not on the
    cluster."""
    script = SLURM_DIR / "bloom560m.sbatch"
    record = tmp_path / "record.jsonl"
    env = slurm_env(script, tmp_path / "run", record)
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True, timeout=120)
    task_env = read_records(record)[0]["env"]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in task_env["XLA_FLAGS"]
    check = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.jit(lambda x: x + 1)(1))"],
        env={**env, "XLA_FLAGS": task_env["XLA_FLAGS"]}, capture_output=True, text=True, timeout=60,
    )
    assert check.returncode == 0 and check.stdout.strip() == "2", check.stderr


def run_until_srun_waits(script, env):
    env = {**env, "FAKE_SRUN_WAIT_FOR_TERM": "1"}
    batch = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    record = pathlib.Path(env["FAKE_SLURM_RECORD"])
    deadline = time.monotonic() + 60
    while not any(r.get("waiting") for r in read_records(record)):
        assert batch.poll() is None and time.monotonic() < deadline, batch.stdout.read()
        time.sleep(0.1)
    return batch


@pytest.mark.parametrize("signum,requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_signal_checkpoints_and_requeues_only_before_the_time_limit(tmp_path, signum, requeued):
    """SIGUSR1 (time limit near): tasks get SIGTERM, job requeued. SIGTERM (preemption or
    scancel): tasks get SIGTERM, SLURM decides about the requeue."""
    script = SLURM_DIR / "bloom560m.sbatch"
    record = tmp_path / "record.jsonl"
    batch = run_until_srun_waits(script, slurm_env(script, tmp_path / "run", record))
    batch.send_signal(signum)
    output, _ = batch.communicate(timeout=30)
    assert batch.returncode == 0, output
    records = read_records(record)
    assert {"tool": "srun", "signal": "SIGTERM"} in records
    requeues = [r["args"] for r in records if r["tool"] == "scontrol"]
    assert requeues == ([["requeue", str(JOB_ID)]] if requeued else [])


def test_missing_model_dir_is_a_clear_error(tmp_path):
    script = SLURM_DIR / "bloom560m.sbatch"
    env = slurm_env(script, tmp_path / "run", tmp_path / "record.jsonl")
    del env["MODEL_DIR"]
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "MODEL_DIR is not set" in result.stderr
    assert not (tmp_path / "record.jsonl").exists()
