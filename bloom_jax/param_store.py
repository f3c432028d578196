"""The parameter store: BLOOM parameters in orbax checkpoints, their config file, streamed save /
open, and which directory a command's --ckpt_dir means.

A checkpoint directory is the root of an `orbax.checkpoint.CheckpointManager`. The root holds
`config.json` (the `BloomConfig` fields, dtypes as names); each step directory holds the item
"params" (the parameter pytree; the trainer's checkpoints, `bloom_jax.checkpoints`, add other
items). A converted Hugging Face checkpoint is step 0 with only "params". A training run's
MODEL_DIR holds its checkpoint directory as `checkpoints/`; loading accepts either.

Parameters may be saved from arrays or from `StreamedArray`s, which are written slab by slab
through orbax's own tensorstore specs, so a model larger than host memory can be saved; and they
may be opened as tensorstores (`open_params`), read slab by slab, for the same reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import linen as nn
from orbax.checkpoint import type_handlers

from bloom_jax.model import BloomConfig, BloomForCausalLM
from partitioning import shardings as shardings_lib

PARAMS = "params"
CONFIG_FILE = "config.json"
ADAPTERS_FILE = "lora.json"  # beside config.json when the steps hold LoRA adapters (lora.py)
# Fields that fix the parameter shapes and numerics; a checkpoint must match the asked-for config
# on these. Compute dtype, scan, remat and dropout are free to differ.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "n_layer", "n_head", "layer_norm_epsilon")


def save_config(directory: str | Path, config: BloomConfig) -> None:
    """Writes `config.json` (all `BloomConfig` fields, dtypes as names) into `directory`."""
    fields = dataclasses.asdict(config)
    fields["dtype"] = jnp.dtype(config.dtype).name
    fields["param_dtype"] = jnp.dtype(config.param_dtype).name
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(fields, indent=2) + "\n")


def load_config(directory: str | Path) -> BloomConfig:
    """Reads the `BloomConfig` saved by `save_config`."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a bloom_jax checkpoint directory (its root "
            "holds config.json) nor a training run's MODEL_DIR (it holds checkpoints/). For a "
            "Hugging Face directory use `bloom_jax.convert from_hf`.")
    try:
        return BloomConfig(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:  # not JSON, not UTF-8, or not BloomConfig's fields
        raise ValueError(f"{path} is damaged ({type(error).__name__}: {error}); restore it from "
                         "a copy (it holds the model's BloomConfig) or choose another "
                         "checkpoint.") from None


def checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory `path` means: `path` itself when it holds config.json, else its
    checkpoints/ folder when it has one (a training run's MODEL_DIR), else `path` unchanged."""
    path = Path(path)
    run_checkpoints = path / "checkpoints"
    if not (path / CONFIG_FILE).is_file() and run_checkpoints.is_dir():
        return run_checkpoints
    return path


def abstract_params(config: BloomConfig) -> Any:
    """The parameter tree of `config` as `jax.ShapeDtypeStruct`s, computed without allocating."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return nn.unbox(shardings_lib.abstract_params(BloomForCausalLM(config), ids))


@dataclasses.dataclass(frozen=True)
class StreamedArray:
    """An array known by shape and dtype whose data is produced slab by slab along axis 0.

    `slabs[k]()` returns rows [k * n, (k + 1) * n) where n = shape[0] // len(slabs); only one slab
    is held in memory at a time while saving.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    slabs: Sequence[Callable[[], np.ndarray]]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _StreamedArrayHandler(type_handlers.NumpyHandler):
    """Saves `StreamedArray`s one slab at a time, one array at a time.

    Writes exactly what orbax's `NumpyHandler` writes for the materialized array (same spec,
    same metadata type), so any orbax restore reads it back; chunks are one slab thick, so a slab
    write never reads or rewrites its neighbours.
    """

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def serialize(self, values, infos, args=None):
        args = [
            dataclasses.replace(arg or ocp.SaveArgs(), shard_axes=(0,)) if len(v.slabs) > 1
            else arg for v, arg in zip(values, args or [None] * len(values))
        ]
        return await super().serialize(values, infos, args)

    async def _background_serialize(self, values, infos, args=None):
        # NumpyHandler starts every array's write at once; the lock lets one write at a time.
        self._one_at_a_time = asyncio.Lock()
        await super()._background_serialize(values, infos, args)

    async def _open_and_write(self, value: StreamedArray, tspec: dict, ts_context: ts.Context):
        async with self._one_at_a_time:
            store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
            rows = value.shape[0] // len(value.slabs)
            for k, slab in enumerate(value.slabs):
                data = np.asarray(slab(), dtype=value.dtype)
                await store[k * rows:(k + 1) * rows].write(data)


class _TensorStoreHandler(type_handlers.NumpyHandler):
    """Restores an array as an open (unread) `ts.TensorStore`, to be read slab by slab."""

    async def deserialize(self, infos, args=None):
        specs = [type_handlers.get_json_tspec_read(info, use_ocdbt=info.is_ocdbt_checkpoint)
                 for info in infos]
        return await asyncio.gather(
            *(ts.open(ts.Spec(spec), open=True, context=info.ts_context)
              for spec, info in zip(specs, infos)))


# Ours first: the standard handlers, added last, keep the "np.ndarray" metadata type for restores.
_REGISTRY = type_handlers.create_type_handler_registry(
    (StreamedArray, _StreamedArrayHandler()),
    (ts.TensorStore, _TensorStoreHandler()),
    *((ty, type_handlers.get_type_handler(ty)) for ty in (np.ndarray, jax.Array)),
)


def _manager(directory: str | Path, streaming: bool = False) -> ocp.CheckpointManager:
    """The manager of `directory`; `streaming` handles `StreamedArray` and `ts.TensorStore`."""
    handlers = None
    if streaming:
        handlers = {PARAMS: ocp.PyTreeCheckpointHandler(type_handler_registry=_REGISTRY)}
    return ocp.CheckpointManager(Path(directory).absolute(), item_handlers=handlers)


def _check_shapes(config: BloomConfig, params: Any) -> None:
    """Raises if `params` is not the tree of `config`'s parameter shapes, naming each mismatch."""
    flat = jax.tree_util.tree_flatten_with_path
    expected = {path: tuple(x.shape) for path, x in flat(abstract_params(config))[0]}
    found = {path: tuple(x.shape) for path, x in flat(params)[0]}
    problems = [f"{jax.tree_util.keystr(path)}: expected {expected.get(path, 'nothing')}, "
                f"found {found.get(path, 'nothing')}"
                for path in sorted(expected.keys() | found.keys(), key=str)
                if expected.get(path) != found.get(path)]
    if problems:
        raise ValueError("Parameters do not match the config: " + "; ".join(problems))


def save_params(directory: str | Path, config: BloomConfig, params: Any, step: int = 0) -> None:
    """Saves `params` (arrays or `StreamedArray`s) as item "params" of `step`, plus config.json."""
    _check_shapes(config, params)
    save_config(directory, config)
    with _manager(directory, streaming=True) as manager:
        manager.save(step, args=ocp.args.Composite(**{PARAMS: ocp.args.PyTreeSave(params)}))
        manager.wait_until_finished()


def _latest_step(manager: ocp.CheckpointManager, directory: str | Path) -> int:
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{directory} holds config.json but no checkpoint step.")
    return step


def checkpoint_config(directory: str | Path, config: BloomConfig | None,
                      fix: str = "pass its own config (param_store.load_config) or another "
                                 "checkpoint") -> BloomConfig:
    """`config` (default: the saved one) after checking it is the saved architecture; the error
    names both and ends with `fix`."""
    saved = load_config(directory)
    if config is None:
        return saved
    diff = {f: (getattr(saved, f), getattr(config, f)) for f in ARCHITECTURE_FIELDS
            if getattr(saved, f) != getattr(config, f)}
    if diff:
        details = ", ".join(f"{f}: checkpoint {a} vs asked {b}" for f, (a, b) in diff.items())
        raise ValueError(f"Checkpoint {directory} was saved for another model ({details}); {fix}.")
    return config


def load_params(
    directory: str | Path,
    config: BloomConfig | None = None,
    shardings: Any = None,
) -> tuple[BloomConfig, Any]:
    """Restores the latest step's "params" as jax arrays of `config.param_dtype`.

    config: the model the caller expects (defaults to the checkpoint's own); its architecture
    must match the checkpoint's. shardings: a tree of `jax.sharding.Sharding` matching the params,
    to restore each array directly onto its devices (default: the default device).
    directory: a checkpoint directory or a training run's MODEL_DIR (see `checkpoint_dir`).
    """
    directory = checkpoint_dir(directory)
    _refuse_adapters(directory)
    config = checkpoint_config(directory, config)
    target = abstract_params(config)
    if shardings is not None:
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
    return config, restore_params(directory, target)


def restore_params(directory: str | Path, target: Any) -> Any:
    """The latest step's "params" of a checkpoint directory, restored as `target`'s shapes."""
    with _manager(directory) as manager:
        step = _latest_step(manager, directory)
        restored = manager.restore(
            step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))
    return restored[PARAMS]


def _refuse_adapters(directory: Path) -> None:
    if (directory / ADAPTERS_FILE).is_file():
        raise ValueError(f"{directory} holds LoRA adapters, not a whole model; merge them into "
                         f"their base: convert to_hf --ckpt_dir=BASE --lora_dir={directory}.")


def open_params(directory: str | Path) -> tuple[BloomConfig, Any]:
    """Opens the latest step's "params" as unread `ts.TensorStore`s (index, then `.read()`);
    `directory` as `load_params` takes it."""
    directory = checkpoint_dir(directory)
    _refuse_adapters(directory)
    config = load_config(directory)
    target = abstract_params(config)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=ts.TensorStore), target)
    with _manager(directory, streaming=True) as manager:
        step = _latest_step(manager, directory)
        restored = manager.restore(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.PyTreeRestore(item=target, restore_args=restore_args)}))
    return config, restored[PARAMS]
