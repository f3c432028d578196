"""bloom_jax/huge_pages.py: the tunable added to an environment, the restart that applies it, and
a command that restarts itself and faults its step's temporaries in far less often."""

import json
import subprocess
import sys
import textwrap

import pytest

from bloom_jax import huge_pages
from tests.conftest import environ_without, needs_huge_pages

# Prints "start" each time it runs, then the environment's tunables and an interpreter option.
RESTARTS = textwrap.dedent("""
    import os, sys
    print("start", flush=True)
    from bloom_jax import huge_pages
    huge_pages.restart_with_huge_pages()
    print(os.environ.get("GLIBC_TUNABLES"), sys.flags.utf8_mode)
""")

def python(*args: str, tunables: str | None = None, timeout: float = 60
           ) -> subprocess.CompletedProcess:
    """`python ARGS` with GLIBC_TUNABLES set to `tunables` (None: unset; the suite sets it)."""
    env = environ_without("GLIBC_TUNABLES")
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("tunables, expected", [
    (None, "glibc.malloc.hugetlb=1"),
    ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),  # the user's choice stands
])
def test_with_huge_pages_adds_the_tunable_unless_it_is_set(tunables, expected):
    env = {"A": "b"} if tunables is None else {"A": "b", "GLIBC_TUNABLES": tunables}
    assert huge_pages.with_huge_pages(env) == {"A": "b", "GLIBC_TUNABLES": expected}


@needs_huge_pages
def test_restart_runs_the_same_command_line_again_once_with_huge_pages():
    done = python("-X", "utf8", "-c", RESTARTS)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "start\nstart\nglibc.malloc.hugetlb=1 1\n"


def test_restart_leaves_a_process_whose_environment_chose_alone():
    done = python("-c", RESTARTS, tunables="glibc.malloc.hugetlb=0")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "start\nglibc.malloc.hugetlb=0 0\n"


@pytest.mark.slow
@needs_huge_pages
def test_a_command_restarts_with_huge_pages_and_faults_its_step_in_far_less():
    """The tiny step's temporaries (73 MB, ~18,700 pages of 4 KiB) fault in at every step with
    glibc's default, kept by a user's hugetlb=0; the command left to choose restarts itself."""
    def faults_per_step(tunables):
        done = python("-m", "bloom_jax.bench", "--gin_file=gin_configs/tiny.gin", "--steps=3",
                      "--warmup_steps=1", "--json", tunables=tunables, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])["host_page_faults_per_step"]

    glibc_default = faults_per_step("glibc.malloc.hugetlb=0")
    assert glibc_default > 10_000
    # Where the kernel finds no free 2 MiB page at once it falls back to 4 KiB ones: under the
    # suite's load up to 5.3% of the pages were seen faulting in one at a time.
    assert faults_per_step(None) < 0.25 * glibc_default
