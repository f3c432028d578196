"""Hugging Face BLOOM checkpoints <-> bloom_jax orbax checkpoints, streamed tensor by tensor.

    python -m bloom_jax.convert from_hf --hf_dir=DIR --out_dir=CKPT
    python -m bloom_jax.convert to_hf --ckpt_dir=CKPT --out_dir=DIR [--vocabulary=FILE]

`from_hf` reads safetensors or PyTorch `.bin` files (single or sharded with an index; keys with
or without the `transformer.` prefix) and writes an orbax checkpoint (`bloom_jax.param_store`) at
step 0, one Hugging Face tensor at a time. `to_hf` reads the latest step of a checkpoint (a
converted one or a trainer's) layer slice by layer slice and writes sharded safetensors plus a
`config.json` that `transformers.BloomForCausalLM.from_pretrained` loads, with the tokenizer files
of the run's vocabulary (`tokenizer.json`, `tokenizer_config.json`) and a
`generation_config.json`, so the directory works in `transformers.pipeline`. Dtypes are kept, so
HF -> bloom_jax -> HF reproduces every tensor bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import tensorstore as ts
from absl import app, flags

from bloom_jax import configs, lora as lora_lib, param_store
from bloom_jax.data import hf_tokenizer, vocabulary_files
from bloom_jax.model import BloomConfig

PREFIX = "transformer."
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
# Old names of Hugging Face BLOOM config keys (some 176B config copies use them).
CONFIG_ALIASES = {"n_embed": "hidden_size", "num_attention_heads": "n_head",
                  "num_hidden_layers": "n_layer"}
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# The BloomConfig fields Hugging Face's config.json holds under the same names, with the default
# transformers assumes when a file omits one (None: required).
HF_FIELDS = {"vocab_size": None, "hidden_size": None, "n_layer": None, "n_head": None,
             "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "hidden_dropout": 0.0,
             "attention_dropout": 0.0}


def config_from_hf(fields: dict, param_dtype: Any) -> BloomConfig:
    """Our config of a Hugging Face `config.json` (old key names already renamed)."""
    return BloomConfig(param_dtype=param_dtype, **{
        name: fields[name] if default is None else fields.get(name, default)
        for name, default in HF_FIELDS.items()})


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One Hugging Face tensor and the parameter it maps to (one layer slice for blocks).

    Hugging Face `Linear` weights are [out, in]; ours are [in, ...out] kernels: `transpose` says
    the weight is transposed before reshaping to our slice shape (and the reverse on the way back).
    """

    path: tuple[str, ...]  # our parameter path
    hf_name: str  # with "{i}" for the layer index inside blocks
    hf_shape: tuple[int, ...]
    transpose: bool = False

    @property
    def stacked(self) -> bool:
        return self.path[0] == "h"

    def to_ours(self, weight: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return (weight.T if self.transpose else weight).reshape(shape)

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        shape = self.hf_shape[::-1] if self.transpose else self.hf_shape
        value = value.reshape(shape)
        return np.ascontiguousarray(value.T if self.transpose else value)


def _tensors(config: BloomConfig) -> list[_Tensor]:
    """Every Hugging Face tensor of `config`'s model (blocks once, with "{i}"), in HF order."""
    h, v = config.hidden_size, config.vocab_size

    def norm(path, name):
        return [_Tensor((*path, "scale"), f"{name}.weight", (h,)),
                _Tensor((*path, "bias"), f"{name}.bias", (h,))]

    def linear(path, name, out, inp):
        return [_Tensor((*path, "kernel"), f"{name}.weight", (out, inp), transpose=True),
                _Tensor((*path, "bias"), f"{name}.bias", (out,))]

    block = [
        *norm(("h", "input_layernorm"), "h.{i}.input_layernorm"),
        *linear(("h", "self_attention", "query_key_value"),
                "h.{i}.self_attention.query_key_value", 3 * h, h),
        *linear(("h", "self_attention", "dense"), "h.{i}.self_attention.dense", h, h),
        *norm(("h", "post_attention_layernorm"), "h.{i}.post_attention_layernorm"),
        *linear(("h", "mlp", "dense_h_to_4h"), "h.{i}.mlp.dense_h_to_4h", 4 * h, h),
        *linear(("h", "mlp", "dense_4h_to_h"), "h.{i}.mlp.dense_4h_to_h", h, 4 * h),
    ]
    return [
        _Tensor(("word_embeddings", "embedding"), "word_embeddings.weight", (v, h)),
        *norm(("word_embeddings_layernorm",), "word_embeddings_layernorm"),
        *block,
        *norm(("ln_f",), "ln_f"),
    ]


def _layer_names(tensor: _Tensor, config: BloomConfig) -> list[str]:
    if not tensor.stacked:
        return [tensor.hf_name]
    return [tensor.hf_name.format(i=i) for i in range(config.n_layer)]


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _tree_from_paths(leaves: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, leaf in leaves.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


# ------------------------------------------------------------------------- reading Hugging Face


def _hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a Hugging Face checkpoint: it has no config.json. Pass the "
            "directory that `save_pretrained` wrote (config.json plus weight files).")
    fields = json.loads(path.read_text())
    if fields.get("model_type") != "bloom":
        raise ValueError(f"{path} has model_type={fields.get('model_type')!r}, not 'bloom': only "
                         "BLOOM checkpoints can be converted.")
    for old, new in CONFIG_ALIASES.items():
        if old in fields:
            fields.setdefault(new, fields.pop(old))
    if not fields.get("tie_word_embeddings", True):
        raise ValueError(f"{path} sets tie_word_embeddings=false; BLOOM (and bloom_jax) ties the "
                         "LM head to the word embeddings.")
    if fields.get("apply_residual_connection_post_layernorm"):
        raise ValueError(f"{path} sets apply_residual_connection_post_layernorm=true; BLOOM (and "
                         "bloom_jax) adds the residual before the LayerNorm.")
    return fields


def _torch_to_numpy(tensor) -> np.ndarray:
    """A CPU torch tensor as numpy, bfloat16 included (numpy's ml_dtypes bfloat16)."""
    import torch  # torch is only needed for .bin checkpoints.

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(jnp.bfloat16)
    return tensor.numpy()


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Reports a damaged weight file (safetensors' and torch's many errors) by its name."""
    try:
        yield
    except Exception as error:
        raise ValueError(f"Weight file {path} cannot be read ({type(error).__name__}: {error}): "
                         "it is damaged or incomplete; download it again.") from error


class _HFReader:
    """Lazy access to the tensors of a Hugging Face BLOOM directory, one tensor at a time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.fields = _hf_config(self.directory)
        self._open: dict[str, Any] = {}
        self.files = self._weight_files()
        names = [name for file in sorted(set(self.files.values())) for name in self._keys(file)]
        self.prefix = PREFIX if any(n.startswith(PREFIX) for n in names) else ""

    def _weight_files(self) -> dict[str, str]:
        """Tensor name -> file name, from the index or the single weight file."""
        for index, single in ((SAFETENSORS_INDEX, "model.safetensors"),
                              (PYTORCH_INDEX, "pytorch_model.bin")):
            if (self.directory / index).is_file():
                weight_map = json.loads((self.directory / index).read_text())["weight_map"]
                for file in sorted(set(weight_map.values())):
                    if not (self.directory / file).is_file():
                        raise FileNotFoundError(
                            f"Shard {file} listed in {self.directory / index} is missing; "
                            "download or copy every shard of the checkpoint.")
                return weight_map
            if (self.directory / single).is_file():
                return {name: single for name in self._keys(single)}
        raise FileNotFoundError(
            f"{self.directory} holds no model.safetensors, pytorch_model.bin, or their "
            ".index.json: it is not a Hugging Face BLOOM checkpoint.")

    def _handle(self, file: str) -> Any:
        """An open safetensors file or a memory-mapped torch state dict (nothing read yet)."""
        if file not in self._open:
            path = self.directory / file
            if file.endswith(".safetensors"):
                with _reading(path):
                    self._open[file] = safetensors.safe_open(path, framework="numpy")
            else:
                try:
                    import torch
                except ImportError as e:
                    raise ImportError(f"Reading {path} (PyTorch .bin) needs torch: pip install "
                                      "torch, or convert the checkpoint to safetensors.") from e
                with _reading(path):
                    self._open[file] = torch.load(path, map_location="cpu", mmap=True,
                                                  weights_only=True)
        return self._open[file]

    def _keys(self, file: str) -> list[str]:
        return list(self._handle(file).keys())

    def _file(self, name: str) -> str:
        full = self.prefix + name
        if full not in self.files:
            raise ValueError(f"Tensor {full} is missing from the checkpoint in {self.directory}; "
                             "it is not a complete BLOOM checkpoint.")
        return self.files[full]

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._handle(self._file(name))
        if isinstance(handle, dict):
            return tuple(handle[self.prefix + name].shape)
        return tuple(handle.get_slice(self.prefix + name).get_shape())

    def read(self, name: str) -> np.ndarray:
        file = self._file(name)
        handle = self._handle(file)
        with _reading(self.directory / file):
            if isinstance(handle, dict):
                return _torch_to_numpy(handle[self.prefix + name])
            return handle.get_tensor(self.prefix + name)

    def config(self) -> BloomConfig:
        return config_from_hf(self.fields, self.read("word_embeddings_layernorm.weight").dtype)


def _streamed_params(reader: _HFReader) -> tuple[BloomConfig, dict]:
    """The config and a tree of `StreamedArray`s reading the checkpoint tensor by tensor.

    Checks every tensor's shape first, from file metadata only; dtypes as each tensor is read.
    """
    config = reader.config()
    abstract = param_store.abstract_params(config)
    leaves = {}
    for tensor in _tensors(config):
        names = _layer_names(tensor, config)
        for name in names:
            if reader.shape(name) != tensor.hf_shape:
                raise ValueError(
                    f"Tensor {reader.prefix + name} has shape {reader.shape(name)}, but the "
                    f"config in {reader.directory} implies {tensor.hf_shape}.")
        target = _get(abstract, tensor.path)
        slab_shape = target.shape[1:] if tensor.stacked else target.shape

        def slab(name, tensor=tensor, slab_shape=slab_shape):
            weight = reader.read(name)
            if weight.dtype != config.param_dtype:
                raise ValueError(f"Tensor {reader.prefix + name} is {weight.dtype}, other "
                                 f"tensors are {config.param_dtype}; the checkpoint must have "
                                 "one dtype.")
            value = tensor.to_ours(weight, slab_shape)
            return value[None] if tensor.stacked else value

        slabs = [functools.partial(slab, name) for name in names]
        leaves[tensor.path] = param_store.StreamedArray(
            tuple(target.shape), np.dtype(config.param_dtype), slabs)
    return config, _tree_from_paths(leaves)


def load_hf_checkpoint(directory: str | Path) -> tuple[BloomConfig, Any]:
    """Reads a Hugging Face BLOOM directory into (config, params) in memory."""
    config, streamed = _streamed_params(_HFReader(directory))
    params = jax.tree.map(
        lambda s: jnp.asarray(np.concatenate([slab() for slab in s.slabs])), streamed,
        is_leaf=lambda x: isinstance(x, param_store.StreamedArray))
    return config, params


def from_hf(hf_dir: str | Path, out_dir: str | Path) -> BloomConfig:
    """Converts a Hugging Face BLOOM directory to a bloom_jax checkpoint (step 0), streamed."""
    if Path(out_dir).exists() and any(Path(out_dir).iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; from_hf writes a new checkpoint "
                              "directory: choose another --out_dir or remove this one.")
    config, streamed = _streamed_params(_HFReader(hf_dir))
    param_store.save_params(out_dir, config, streamed, step=0)
    return config


# ------------------------------------------------------------------------- writing Hugging Face


# BLOOM's special ids (its tokenizer.json), for a config.json written without a vocabulary.
BLOOM_SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}


def hf_config_fields(config: BloomConfig, special_ids: dict | None = None) -> dict:
    """Hugging Face's `config.json` of a BLOOM with `config`'s shape and numerics and the
    vocabulary's `special_ids` (default: BLOOM's)."""
    return {
        "architectures": ["BloomForCausalLM"],
        "model_type": "bloom",
        **{name: getattr(config, name) for name in HF_FIELDS},
        "apply_residual_connection_post_layernorm": False,
        **(special_ids or BLOOM_SPECIAL_IDS),
        "tie_word_embeddings": True,
        "dtype": jnp.dtype(config.param_dtype).name,
    }


def _read(leaf: Any, index: tuple) -> np.ndarray:
    """`leaf[index]` as numpy, for in-memory arrays and (unread) tensorstores alike."""
    if isinstance(leaf, ts.TensorStore):
        return leaf[index].read().result()
    return np.asarray(leaf[index])


def _hf_tensors(config: BloomConfig, params: Any) -> Iterator[tuple[str, int, Callable]]:
    """(HF name, byte size, reader of the HF tensor) for every tensor, in HF order."""
    itemsize = jnp.dtype(config.param_dtype).itemsize
    for tensor in _tensors(config):
        leaf = _get(params, tensor.path)
        for i, name in enumerate(_layer_names(tensor, config)):
            index = (i,) if tensor.stacked else ()
            yield (PREFIX + name, itemsize * int(np.prod(tensor.hf_shape)),
                   lambda t=tensor, index=index, leaf=leaf: t.to_hf(_read(leaf, index)))


def save_hf_checkpoint(
    config: BloomConfig,
    params: Any,
    directory: str | Path,
    vocabulary: Any,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Writes `params` as a whole Hugging Face BLOOM directory: safetensors shards, index,
    config.json, generation_config.json and the tokenizer files of `vocabulary`.

    params: arrays or `ts.TensorStore`s (from `param_store.open_params`); a shard of at most
    `max_shard_bytes` (or one tensor, if larger) is the most held in memory at once.
    vocabulary: a SentencePiece model or a tokenizer.json (`vocabulary_files.open_vocabulary`).
    """
    vocabulary_files.check_fits_model(vocabulary.vocab_size, vocabulary.path, config.vocab_size)
    shards: list[list[tuple[str, Callable]]] = [[]]
    size = 0
    for name, nbytes, read in _hf_tensors(config, params):
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, read))
        size += nbytes

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
        safetensors.numpy.save_file({name: read() for name, read in shard}, out / file,
                                    metadata={"format": "pt"})
        weight_map.update({name: file for name, _ in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(n for _, n, _ in _hf_tensors(config, params))},
                 "weight_map": weight_map}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    ids = hf_tokenizer.write_tokenizer_files(vocabulary, out)
    special = {name: ids[name] for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "config.json").write_text(json.dumps(hf_config_fields(config, special), indent=2)
                                     + "\n")
    # Greedy by default, as `bloom_jax.generate` is; stops at the vocabulary's EOS.
    generation = {**special, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def to_hf(ckpt_dir: str | Path, out_dir: str | Path, vocabulary: str | Path | None = None,
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
          lora_dir: str | Path | None = None) -> BloomConfig:
    """Converts the latest step of a bloom_jax checkpoint to a Hugging Face directory, streamed.

    vocabulary: the run's VOCABULARY (a SentencePiece .model or tokenizer.json); None: the
    embedded SentencePiece model, as the trainer and `generate` default to.
    lora_dir: a LoRA run whose adapters are merged into `ckpt_dir`'s weights (its base).
    """
    config, stores = param_store.open_params(ckpt_dir)
    if lora_dir:
        lora, adapters = lora_lib.load_adapters(lora_dir, config)
        stores = lora_lib.merged_for_export(stores, adapters, lora)
    save_hf_checkpoint(config, stores, out_dir, vocabulary_files.open_vocabulary(vocabulary),
                       max_shard_bytes)
    return config


# ------------------------------------------------------------------------- command line


FLAGS = flags.FLAGS
USAGE = ("python -m bloom_jax.convert from_hf --hf_dir=DIR --out_dir=CKPT\n"
         "python -m bloom_jax.convert to_hf --ckpt_dir=CKPT --out_dir=DIR [--vocabulary=FILE] "
         "[--lora_dir=RUN]")


def define_flags() -> None:
    """The converter's flags (configs.run adds --verbose)."""
    flags.DEFINE_string("hf_dir", None, "from_hf: a Hugging Face BLOOM directory, as "
                        "save_pretrained writes it (config.json + safetensors or .bin weights).")
    flags.DEFINE_string("ckpt_dir", None, "to_hf: a bloom_jax checkpoint directory (converted, or "
                        "a training run's MODEL_DIR or its checkpoints/ folder); its latest step "
                        "is converted.")
    flags.DEFINE_string("out_dir", None, "The directory to write: a new checkpoint (from_hf, at "
                        "step 0) or a Hugging Face directory (to_hf).")
    flags.DEFINE_integer("max_shard_bytes", DEFAULT_MAX_SHARD_BYTES,
                         "to_hf: the largest safetensors file to write.")
    flags.DEFINE_string("vocabulary", None, "to_hf: the run's VOCABULARY (tokenizer.json or "
                        "SentencePiece .model), written as tokenizer.json (default: the embedded "
                        "SentencePiece model, as the trainer's).")
    flags.DEFINE_string("lora_dir", None, "to_hf: a LoRA run (its MODEL_DIR or checkpoints/) "
                        "whose adapters are merged into --ckpt_dir, the base they were trained on.")


def main(argv: Sequence[str]) -> None:
    command = argv[1:]
    needed = {"from_hf": ("hf_dir", "out_dir"), "to_hf": ("ckpt_dir", "out_dir")}
    if len(command) != 1 or command[0] not in needed:
        raise app.UsageError(f"Give one command, from_hf or to_hf:\n{USAGE}")
    missing = [f"--{name}" for name in needed[command[0]] if not FLAGS[name].value]
    if missing:
        raise app.UsageError(f"{command[0]} needs {' and '.join(missing)}:\n{USAGE}")
    if command[0] == "from_hf":
        config = from_hf(FLAGS.hf_dir, FLAGS.out_dir)
        print(f"Wrote {FLAGS.out_dir} (step 0) from {FLAGS.hf_dir}: {config}")
    else:
        config = to_hf(FLAGS.ckpt_dir, FLAGS.out_dir, FLAGS.vocabulary, FLAGS.max_shard_bytes,
                       FLAGS.lora_dir)
        print(f"Wrote {FLAGS.out_dir} from {FLAGS.ckpt_dir}: {config}")


if __name__ == "__main__":
    define_flags()
    # ImportError: a .bin checkpoint without torch installed (the message says what to install).
    configs.run(main, reported=(*configs.REPORTED_ERRORS, ImportError), gin_flags=False)
