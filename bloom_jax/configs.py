"""gin wiring shared by every command: the --gin_file / --gin.NAME=VALUE flags and their parsing.

Every config accepts the same macros (MODEL_DIR, DATA_DIR, TRAIN_STEPS, BATCH_SIZE,
SEQUENCE_LENGTH, SEED, INIT_FROM; see gin_configs/base.gin). `--gin.NAME=VALUE` is t5x's
shorthand for `--gin_bindings='NAME = VALUE'`; a VALUE that is not a gin literal (a bare path)
is taken as a string, so `--gin.MODEL_DIR=/tmp/run` needs no quotes.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re
import sys
from collections.abc import Callable, Sequence

import gin
from absl import app, flags

from bloom_jax import metrics, model, optim

GIN_CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin_configs"

# gin's handle on the model config: calling it gives the BloomConfig the parsed files bind.
BloomConfig = gin.external_configurable(model.BloomConfig, module="bloom_jax")
flags.disclaim_key_flags()  # the gin flags are the command's own: its --help lists them


def define_flags() -> None:
    """Defines --gin_file and --gin_bindings (call once per command, at import)."""
    flags.DEFINE_multi_string("gin_file", [], "gin config file(s), e.g. gin_configs/tiny.gin; "
                              "looked up as given, then in the project's gin_configs/ folder.")
    flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings, e.g. 'TRAIN_STEPS = 10'; "
                              "or use the shorthand --gin.TRAIN_STEPS=10.")


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """Turns each `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE` (before absl parses argv)."""
    rewritten = []
    for arg in argv:
        match = re.fullmatch(r"--gin\.([^=]+)=(.*)", arg, flags=re.DOTALL)
        if match:
            arg = f"--gin_bindings={binding(*match.groups())}"
        rewritten.append(arg)
    return rewritten


def binding(name: str, value: str) -> str:
    """The gin binding `NAME = VALUE` of a command-line value (a bare string gets quoted)."""
    return f"{name} = {_as_gin_value(value)}"


def _as_gin_value(value: str) -> str:
    """`value` if it is a gin literal or reference, else `value` quoted as a string."""
    if value.startswith(("@", "%")):
        return value
    try:
        ast.literal_eval(value)
        return value
    except (ValueError, SyntaxError):
        return repr(value)


def parse(gin_files: Sequence[str], bindings: Sequence[str] = ()) -> None:
    """Parses config files then bindings; unknown or misspelled names raise gin's error here,
    before any work is done."""
    # Every configurable must be registered before parsing, whichever command parses.
    import bloom_jax.trainer  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

    gin.add_config_file_search_path(str(GIN_CONFIGS_DIR))
    gin.add_config_file_search_path(str(GIN_CONFIGS_DIR.parent))
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings))


def parse_flags(require_file: bool = True) -> None:
    """Parses the gin flags of the running command (after absl has parsed argv)."""
    if require_file and not flags.FLAGS.gin_file:
        raise app.UsageError("No --gin_file given; pass one of the configs in "
                             f"{GIN_CONFIGS_DIR}, e.g. --gin_file=gin_configs/tiny.gin.")
    parse(flags.FLAGS.gin_file, flags.FLAGS.gin_bindings)


# Errors that describe bad input (a binding, a path, a mesh, a checkpoint): reported as one line.
# gin's own errors are ValueErrors and SyntaxErrors.
REPORTED_ERRORS = (ValueError, SyntaxError, OSError)
# What gin appends to an error raised under it: "\n  In call to configurable 'train' (...)".
_GIN_CONTEXT = re.compile(r"\n  In (?:call to configurable|file|bindings string) ")


def error_line(error: Exception) -> str:
    """The error's own message, without the trail of configurables gin appends to it."""
    return _GIN_CONTEXT.split(str(error), maxsplit=1)[0]


def run(main: Callable[[list[str]], None],
        reported: tuple[type[Exception], ...] = REPORTED_ERRORS) -> None:
    """Runs a command's `main` under absl with the gin flags (and their --gin.NAME=VALUE form)
    defined and the libraries' INFO chatter filtered from the console. A `reported` error ends
    the command with one line `error: ...` and exit status 1 (--verbose: the traceback)."""
    define_flags()
    flags.DEFINE_bool("verbose", False, "On bad input, show the traceback, not just the error.")

    def reporting_main(argv: list[str]) -> None:
        metrics.quiet_library_logs()
        try:
            main(argv)
        except reported as error:
            if flags.FLAGS.verbose:
                raise
            sys.exit(f"error: {error_line(error)} (--verbose shows the traceback)")

    app.run(reporting_main, flags_parser=lambda argv: flags.FLAGS(rewrite_gin_args(argv)))


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one train step processes, read from the parsed gin config as the trainer reads it;
    the planner, benchmark and evaluation take their shapes from here."""

    model_config: model.BloomConfig
    batch_size: int  # global sequences per optimizer step (after any ramp-up)
    sequence_length: int
    micro_batch_size: int | None  # sequences per data-parallel shard per micro-step

    @classmethod
    def from_gin(cls) -> Workload:
        train = gin.get_bindings("train")  # references evaluated: model_config is a BloomConfig
        return cls(model_config=train["model_config"],
                   batch_size=optim.BatchRampUp().global_batch_size,
                   sequence_length=gin.get_bindings("make_stream")["sequence_length"],
                   micro_batch_size=train.get("micro_batch_size"))

    @property
    def tokens(self) -> int:
        return self.batch_size * self.sequence_length
