"""Runs one command as N jax processes on this machine, each with its own simulated CPU devices.

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \\
      python -m bloom_jax.train --gin_file=gin_configs/tiny.gin --gin.MODEL_DIR=/tmp/run

Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (read by `bloom_jax.distributed.initialize`), JAX_PLATFORMS=cpu and
`--xla_force_host_platform_device_count`, and glibc.malloc.hugetlb=1 added to GLIBC_TUNABLES
(unless the caller's sets it; bloom_jax/huge_pages.py). Output is streamed line by line with a
`[pN]` prefix. If a process fails, the others get `--grace_s` seconds to stop on their own, then
SIGTERM, then SIGKILL; the exit status is that of the first failure. SIGINT and SIGTERM are
forwarded to every process. Of the package it imports only huge_pages (standard library only).
"""

import argparse
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

from bloom_jax import huge_pages

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_POLL_S = 0.1


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the coordinator binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(
    base: dict[str, str], process_id: int, num_processes: int, devices_per_process: int, port: int
) -> dict[str, str]:
    """The environment of process `process_id`: jax's variables on top of `base`, and glibc's
    malloc on transparent huge pages (a program that is not a bloom_jax command gets them too)."""
    xla_flags = [f for f in base.get("XLA_FLAGS", "").split()
                 if not f.startswith(_DEVICE_COUNT_FLAG)]
    xla_flags.append(f"{_DEVICE_COUNT_FLAG}={devices_per_process}")
    return {
        **huge_pages.with_huge_pages(base),
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(num_processes),
        "JAX_PROCESS_ID": str(process_id),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join(xla_flags),
        "PYTHONUNBUFFERED": "1",  # Lines reach the prefixing stream as they are printed.
    }


def _describe(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def _exit_status(returncode: int) -> int:
    """A process's return code as a shell exit status (128 + N for signal N)."""
    return 128 - returncode if returncode < 0 else returncode


class _Launcher:
    """Owns the child processes: streams their output, watches them, stops them together."""

    def __init__(self, command: list[str], num_processes: int, devices_per_process: int,
                 port: int, grace_s: float):
        self._grace_s = grace_s
        self._print_lock = threading.RLock()  # Re-entrant: the signal handler prints too.
        self._procs = [
            subprocess.Popen(
                command,
                env=process_env(dict(os.environ), i, num_processes, devices_per_process, port),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Its own process group: signals reach its children too.
            )
            for i in range(num_processes)
        ]
        self._readers = [
            threading.Thread(target=self._stream, args=(i, p.stdout), daemon=True)
            for i, p in enumerate(self._procs)
        ]
        # (process id, return code) in the order the processes exit: a poll that finds several
        # exited cannot tell which failed first (a killed process, or the peer that failed of it).
        self._exits = queue.Queue()
        waiters = [threading.Thread(target=lambda i=i, p=p: self._exits.put((i, p.wait())),
                                    daemon=True) for i, p in enumerate(self._procs)]
        for thread in self._readers + waiters:
            thread.start()

    def say(self, message: str) -> None:
        with self._print_lock:
            print(f"[launch] {message}", flush=True)

    def _stream(self, process_id: int, pipe) -> None:
        for raw in iter(pipe.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with self._print_lock:
                print(f"[p{process_id}] {line}", flush=True)

    def signal_all(self, signum: int) -> None:
        for p in self._procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signum)
                except ProcessLookupError:
                    pass

    def _wait_all(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(p.poll() is not None for p in self._procs):
                return True
            time.sleep(_POLL_S)
        return all(p.poll() is not None for p in self._procs)

    def stop(self) -> None:
        """Gives the running processes the grace period, then SIGTERM, then SIGKILL."""
        if self._wait_all(self._grace_s):
            return
        self.say(f"stopping the remaining processes with SIGTERM after {self._grace_s:g} s")
        self.signal_all(signal.SIGTERM)
        if self._wait_all(self._grace_s):
            return
        self.say("the remaining processes ignored SIGTERM; sending SIGKILL")
        self.signal_all(signal.SIGKILL)
        self._wait_all(self._grace_s)

    def run(self) -> int:
        """Waits for every process; returns 0, or the exit status of the first that failed."""
        status = 0
        for _ in self._procs:
            process_id, code = self._exits.get()
            if code != 0:
                self.say(f"process {process_id} {_describe(code)}; stopping the others")
                self.stop()
                status = _exit_status(code)
                break
        for reader in self._readers:
            reader.join(timeout=self._grace_s)
        return status


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --num_processes=N --devices_per_process=D [--port=P] -- COMMAND...",
    )
    parser.add_argument("--num_processes", type=int, required=True, help="processes to start")
    parser.add_argument("--devices_per_process", type=int, required=True,
                        help="simulated CPU devices in each process")
    parser.add_argument("--port", type=int, default=None,
                        help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--grace_s", type=float, default=10.0,
                        help="seconds the others get to stop on their own after one fails")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after `--`")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given: put it after `--`, e.g. -- python -m bloom_jax.train ...")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be at least 1")

    launcher = _Launcher(command, args.num_processes, args.devices_per_process,
                         args.port or _free_port(), args.grace_s)

    def forward(signum, frame):
        launcher.say(f"received {signal.Signals(signum).name}; forwarding it to every process")
        launcher.signal_all(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
