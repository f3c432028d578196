"""Fixtures for every test: each starts and ends with an empty gin config and pytest's own
SIGTERM / SIGINT handlers (the trainer and distributed.initialize install theirs). The number of
pytest-xdist workers `--numprocesses=auto` starts; `build_once`, a module fixture's folder built
by one worker for all; the XLA flags of the processes the suite starts (`xla_flags`). The
workers and every process a test starts share one persistent compilation cache, compile fast
(`SUITE_XLA_FLAGS`: LLVM at -O0, XLA's elemental fusion emitters), and run with glibc's malloc on
transparent huge pages, as the commands choose for themselves (huge_pages.py); `environ_without`
gives the environment of a user who did not choose."""

import fcntl
import os
import pathlib
import shutil
import signal
import tempfile
from collections.abc import Callable

import gin
import pytest

from bloom_jax import huge_pages


def xla_flags(*flags: str, devices: int | None = None) -> str:
    """XLA_FLAGS for a process the suite starts: this process's, `flags`, and `devices`
    simulated CPU devices when given."""
    if devices:
        flags += (f"--xla_force_host_platform_device_count={devices}",)
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


@pytest.fixture(autouse=True)
def clean_gin_and_signals():
    """Clears gin before and after the test; puts back the SIGTERM / SIGINT handlers it found."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    gin.clear_config()
    yield
    gin.clear_config()
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


needs_huge_pages = pytest.mark.skipif(not huge_pages.available(),
                                      reason="needs glibc >= 2.35 and kernel THP")


# The variables of the suite's compilation cache (set below where the environment names none).
COMPILATION_CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR",
                               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
_OWN_COMPILATION_CACHE = pytest.StashKey[str]()


def environ_without(*names: str) -> dict[str, str]:
    """This process's environment less `names` (GLIBC_TUNABLES, COMPILATION_CACHE_VARIABLES: the
    suite sets them, below): that of a user who chose none of them."""
    return {k: v for k, v in os.environ.items() if k not in names}


# The suite's programs are tiny: compiling them fast matters more than their code's speed.
# - LLVM at -O0 (the suite took 428 s instead of 707 s on 2 cores): the optimized HLO is a default
#   compile's; only the machine code differs.
# - XLA's older elemental emitters for fusions, not the MLIR ones (the suite: 2,160 -> 1,800
#   CPU-seconds; eight_device_steps.py: 46 -> 29): XLA fuses elementwise ops differently (147
#   fusions instead of 210 in a tiny model's gradient); sharding and collectives are unchanged
#   (the collectives tests read them from the compiled programs).
# Floats may differ in their last bits from a default compile's, and between two programs that
# fuse the same ops differently. A flag the environment's XLA_FLAGS names is kept.
SUITE_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def pytest_configure(config):
    """Before pytest-xdist starts its workers, which inherit the environment: huge pages,
    `SUITE_XLA_FLAGS`, and one persistent compilation cache for the session (unless the
    environment names one), so a program that a test, a worker or a command compiled is read,
    not compiled again, by the others."""
    os.environ.update(huge_pages.with_huge_pages(os.environ))
    named = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = xla_flags(*(flag for flag in SUITE_XLA_FLAGS
                                          if flag.split("=")[0] not in named))
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        cache = config.stash[_OWN_COMPILATION_CACHE] = tempfile.mkdtemp(prefix="jax_cache_")
        # Every program: jax keeps only those over 1 s by default, and many tiny ones take less.
        os.environ.update(zip(COMPILATION_CACHE_VARIABLES, (cache, "0")))


def pytest_unconfigure(config):
    """Removes the session's compilation cache, in the process that made it."""
    if _OWN_COMPILATION_CACHE in config.stash:
        shutil.rmtree(config.stash[_OWN_COMPILATION_CACHE], ignore_errors=True)


def pytest_xdist_auto_num_workers(config):
    """One worker more than cores (at most 4): many tests spend their time waiting on the
    training processes they start, and a third worker fills 2 cores while two wait."""
    del config
    return min(4, (os.cpu_count() or 1) + 1)


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory, worker_id) -> pathlib.Path:
    """A folder this session's pytest-xdist workers share (the session's own with -n 0)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


def build_once(shared_tmp: pathlib.Path, name: str,
               build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """`shared_tmp`/`name`, filled by `build` in the first worker that asks for it while the
    others wait (a module fixture's run, made once however many workers run its tests)."""
    folder = shared_tmp / name
    with open(shared_tmp / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared_tmp / f"{name}.built").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            build(folder)
            (shared_tmp / f"{name}.built").touch()
    return folder
