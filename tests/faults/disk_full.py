"""Runs `python -m bloom_jax.train ARGS` with every background write of a checkpoint's data
position failing as a full disk would (root ignores file modes, so the fault is injected)."""

import runpy
import sys

import orbax.checkpoint as ocp


async def _disk_full(self, item, directory):
    raise OSError("No space left on device")


ocp.handlers.JsonCheckpointHandler._save_fn = _disk_full
sys.argv = ["bloom_jax.train", *sys.argv[1:]]
runpy.run_module("bloom_jax.train", run_name="__main__")
