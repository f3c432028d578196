"""Runs `python -m bloom_jax.<command> ARGS...` (or `python SCRIPT.py ARGS...`) as its own
process, forked from a zygote that imported the libraries the commands share once.

    run(["train", "--gin_file=gin_configs/tiny.gin", ...], env=...)  # a CompletedProcess
    start(["train", ...], log, env=...)  # running, as a Popen: pid, poll, wait, send_signal
Each command is a process of its own, with its own pid, environment, working directory, argv,
flags and exit status, and runs its module as `python -m` does (`runpy`, as `__main__`); only the
third-party imports (TensorFlow's ~5 s among them) are the zygote's, made once per test process.
The zygote is multiprocessing's fork server, started on first use with SHARED_LIBRARIES imported,
no JAX backend started and no JAX_* variable set: a command reads XLA_FLAGS when it starts its
backend, and sets the jax options its own JAX_* variables name, as `import jax` would. Other
variables that a shared library reads once, at import (huggingface_hub's HF_HUB_OFFLINE) or at
start (glibc's MALLOC_ARENA_MAX), do not reach it: a test that sets one starts a subprocess.
"""

import atexit
import functools
import json
import multiprocessing
import multiprocessing.forkserver
import os
import pathlib
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback

import jax
from jax._src import config as jax_config

from tests.conftest import build_once

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 300

# What the commands import (TensorFlow through seqio and clu); none of it starts a backend.
SHARED_LIBRARIES = ("tensorflow", "seqio", "jax", "flax.linen", "optax", "orbax.checkpoint",
                    "clu.metric_writers", "tensorstore", "sentencepiece", "fastapi", "uvicorn")


def run_module(argv: list[str]) -> int:
    """`python -m bloom_jax.<argv[0]> argv[1:]` (`python argv[0] argv[1:]` for a .py file) in
    this process; its exit status."""
    try:
        if argv[0].endswith(".py"):
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
        else:
            sys.argv = [f"bloom_jax.{argv[0]}", *argv[1:]]
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


def _jax_option(kind: type | str, variable: str):
    """The value `import jax` reads from the environment `variable` for an option of `kind`."""
    if kind is bool:
        return jax_config.bool_env(variable, False)
    return kind(os.environ[variable]) if kind in (int, float) else os.environ[variable]


def _read_jax_environment() -> None:
    """Sets each jax option that a JAX_* variable of this environment names."""
    for name, (kind, _, _) in jax.config.meta.items():
        if name.upper() in os.environ:
            jax.config.update(name, _jax_option(kind, name.upper()))


def _command_process(argv: list[str], env: dict[str, str], cwd: str, stdout: str,
                     stderr: str) -> None:
    """The forked command's body: `argv` in `cwd` with the environment `env`, its output appended
    to the files `stdout` and `stderr`; it exits as the interpreter would, with its status."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    _read_jax_environment()
    for fd, path in ((1, stdout), (2, stderr)):
        with open(path, "ab") as file:
            os.dup2(file.fileno(), fd)
    code = run_module(argv)
    atexit._run_exitfuncs()  # pylint: disable=protected-access
    sys.exit(code)


@functools.cache
def _zygote() -> multiprocessing.context.BaseContext:
    """This process's fork server, started with SHARED_LIBRARIES imported and no JAX_* set."""
    context = multiprocessing.get_context("forkserver")
    # A fork server that this process started before (data/builder.py's, for its workers) has
    # neither these libraries nor this environment: it stops, and this one starts.
    multiprocessing.forkserver._forkserver._stop()  # pylint: disable=protected-access
    context.set_forkserver_preload([*SHARED_LIBRARIES, __name__])
    jax_variables = {name: os.environ.pop(name) for name in list(os.environ)
                     if name.startswith("JAX_")}
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.update(jax_variables)
    return context


class Command:
    """A started command, as subprocess.Popen offers one: pid, returncode, poll, wait,
    send_signal and kill (a signal to a command that ended is not sent)."""

    def __init__(self, argv: list[str], process: multiprocessing.Process):
        self.args, self.pid, self._process = argv, process.pid, process

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _start(argv: list[str], stdout: pathlib.Path, stderr: pathlib.Path,
           env: dict[str, str] | None, cwd: pathlib.Path) -> Command:
    for path in (stdout, stderr):
        path.write_bytes(b"")
    process = _zygote().Process(target=_command_process, args=(
        argv, dict(os.environ if env is None else env), str(cwd), str(stdout), str(stderr)))
    process.start()
    return Command(argv, process)


def start(argv: list[str], log: pathlib.Path, env: dict[str, str] | None = None,
          cwd: pathlib.Path = ROOT) -> Command:
    """Starts `argv`, its stdout and stderr going to `log`, in `env` (default: this process's)."""
    return _start(argv, log, log, env, cwd)


def run(argv: list[str], env: dict[str, str] | None = None, cwd: pathlib.Path = ROOT,
        timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Runs `argv` to its end (killed after `timeout` seconds, raising TimeoutExpired); its exit
    status and its stdout and stderr as text."""
    with tempfile.TemporaryDirectory() as tmp:
        stdout, stderr = pathlib.Path(tmp, "stdout"), pathlib.Path(tmp, "stderr")
        command = _start(argv, stdout, stderr, env, cwd)
        try:
            returncode = command.wait(timeout)
        finally:
            command.kill()
        return subprocess.CompletedProcess(argv, returncode, stdout.read_text(),
                                           stderr.read_text())


def run_commands(*argvs: list[str], env: dict[str, str] | None = None,
                 ) -> list[subprocess.CompletedProcess]:
    """`run` for each argv, one after the other."""
    return [run(argv, env) for argv in argvs]


def run_commands_once(shared_tmp: pathlib.Path, name: str, *argvs: list[str],
                      env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """run_commands in the first pytest-xdist worker that asks (conftest.build_once); every
    worker gets its results."""
    folder = build_once(shared_tmp, name, lambda folder: (folder / "results.json").write_text(
        json.dumps([vars(result) for result in run_commands(*argvs, env=env)])))
    return [subprocess.CompletedProcess(**result)
            for result in json.loads((folder / "results.json").read_text())]


def heavy_modules_after(code: str, heavy: tuple[str, ...] = ("seqio", "tensorflow")) -> list[str]:
    """Which of the `heavy` modules a fresh Python process holds after running `code` (a new
    interpreter, not a fork of the zygote, which imported them all)."""
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])
