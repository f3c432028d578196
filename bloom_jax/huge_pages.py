"""Transparent huge pages for glibc's malloc, which XLA's CPU steps fault in far less often.

XLA's CPU client mallocs all of an execution's temporaries as one block, which glibc maps afresh
and unmaps at every call, so every step faults it in again 4 KiB at a time (the tiny train step:
about 15,000 faults, a third of its time). glibc >= 2.35 backs the blocks it maps with
transparent huge pages when GLIBC_TUNABLES holds glibc.malloc.hugetlb=1, and reads that only
when a process starts: so `python -m bloom_jax.<command>` restarts itself with it
(bloom_jax/__init__.py) before importing anything, and launch/local.py starts its processes with
it. A glibc.malloc.hugetlb the user set stands (=0 keeps glibc's default). Standard library only.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
_TRANSPARENT_HUGE_PAGES = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """glibc >= 2.35 (the tunable) on a kernel whose transparent huge pages are on."""
    if "CS_GNU_LIBC_VERSION" not in os.confstr_names:
        return False
    name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    return (name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
            and _TRANSPARENT_HUGE_PAGES.exists()
            and "[never]" not in _TRANSPARENT_HUGE_PAGES.read_text())


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with glibc.malloc.hugetlb=1 added to its GLIBC_TUNABLES, unless they set it."""
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith(TUNABLE + "=") for t in tunables):
        tunables.append(f"{TUNABLE}=1")
    return {**env, "GLIBC_TUNABLES": ":".join(tunables)}


def restart_with_huge_pages() -> None:
    """Re-executes this process's command line (same interpreter, options and arguments) with
    huge pages, where glibc and the kernel have them and the environment does not yet choose;
    otherwise returns."""
    env = with_huge_pages(os.environ)
    if env["GLIBC_TUNABLES"] != os.environ.get("GLIBC_TUNABLES") and available():
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
