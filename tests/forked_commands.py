"""Runs several `python -m bloom_jax.<command> ARGS...` whose own work is short (--help, a bad
flag, bad input, a tiny model's few steps), one after the other, each in its own forked process,
after importing the libraries they share once.

    python tests/forked_commands.py '[["train", "--help"], ["plan", "--no_such_flag=1"]]'
prints a JSON list of {"returncode", "stdout", "stderr"}, one per command line. Each child runs
its command module as `python -m` does (`runpy`, as `__main__`, with its own argv and flags);
only the third-party imports (TensorFlow's ~5 s among them) are the parent's, made once.
Tests call it through `run_commands` and `run_commands_once`.
"""

import json
import os
import pathlib
import runpy
import subprocess
import sys
import tempfile
import traceback

from tests.conftest import build_once

ROOT = pathlib.Path(__file__).resolve().parents[1]

# What the commands import (TensorFlow through seqio and clu); none of it starts a backend.
SHARED_LIBRARIES = ("tensorflow", "seqio", "jax", "flax.linen", "optax", "orbax.checkpoint",
                    "clu.metric_writers", "tensorstore", "sentencepiece", "fastapi", "uvicorn")


def run_module(argv: list[str]) -> int:
    """`python -m bloom_jax.<argv[0]> argv[1:]` in this process; its exit status."""
    sys.argv = [f"bloom_jax.{argv[0]}", *argv[1:]]
    try:
        runpy.run_module(f"bloom_jax.{argv[0]}", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except BaseException:  # pylint: disable=broad-except  # as the interpreter reports it
        traceback.print_exc()
        return 1
    return 0


def forked(argv: list[str]) -> dict:
    """Runs `argv` in a child process; its exit status and its stdout and stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            code = run_module(argv)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {"returncode": os.waitstatus_to_exitcode(status),
                "stdout": out.read().decode(), "stderr": err.read().decode()}


def _results(argvs: tuple[list[str], ...], env: dict[str, str] | None) -> list[dict]:
    """This script's JSON output for `argvs`, run in a fresh interpreter."""
    done = subprocess.run([sys.executable, __file__, json.dumps(argvs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(env or os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def run_commands(*argvs: list[str], env: dict[str, str] | None = None,
                 ) -> list[subprocess.CompletedProcess]:
    """`python -m bloom_jax.<argv[0]> argv[1:]` for each argv, one after the other, each forked
    from one process that imported their libraries once: for commands whose own work is short
    (--help, bad input, a tiny model's few steps), whose time would be mostly those imports."""
    return [subprocess.CompletedProcess(argv, **result)
            for argv, result in zip(argvs, _results(argvs, env))]


def run_commands_once(shared_tmp: pathlib.Path, name: str, *argvs: list[str],
                      env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """run_commands in the first pytest-xdist worker that asks (conftest.build_once); every
    worker gets its results."""
    folder = build_once(shared_tmp, name, lambda folder: (folder / "results.json").write_text(
        json.dumps(_results(argvs, env))))
    results = json.loads((folder / "results.json").read_text())
    return [subprocess.CompletedProcess(argv, **result) for argv, result in zip(argvs, results)]


if __name__ == "__main__":
    for library in SHARED_LIBRARIES:
        __import__(library)
    print(json.dumps([forked(argv) for argv in json.loads(sys.argv[1])]))
