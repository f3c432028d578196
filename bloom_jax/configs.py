"""Command wiring shared by every `python -m bloom_jax.*` command: flags, gin, one error line.

Every config accepts the same macros (MODEL_DIR, DATA_DIR, TOKENS_DIR, TRAIN_STEPS, BATCH_SIZE,
SEQUENCE_LENGTH, MICRO_BATCH_SIZE, SEED, INIT_FROM, VOCABULARY, DOCUMENT_MASKING; see
gin_configs/base.gin).
`--gin.NAME=VALUE` is t5x's shorthand for `--gin_bindings='NAME = VALUE'`; a VALUE that is not a
gin literal (a bare path) is taken as a string, so `--gin.MODEL_DIR=/tmp/run` needs no quotes.

This module imports nothing of the model, the step or the loop. Configurables are registered by
the library modules that define them, which each command imports before it parses: the trainer
registers every configurable a config binds and parses strictly (a misspelled name fails;
so does, in every command, a macro that no config file defines or uses); a command that reads a
training config without running the loop skips the loop's configurables by name
(`LOOP_CONFIGURABLES`; `OUTSIDE_THE_STEP` adds the data stream's, for commands that read no
data), and the data tools, which read only a config's data settings, skip every configurable
they do not load (gin's `skip_unknown`).
"""

from __future__ import annotations

import ast
import difflib
import logging as py_logging
import os
import pathlib
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
from absl import app, flags

GIN_CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin_configs"
BASE_CONFIG = "base.gin"  # the macros and defaults every size file includes
# Configurables only the training loop registers; plan, bench and evaluate read a training
# config without the loop and skip their bindings (tests/test_configs.py keeps these lists true).
LOOP_CONFIGURABLES = ("train", "CheckpointOptions", "initialize", "make_instruction_stream",
                      "instruction_validation_streams")
# The data stream's (data/pipeline.py, data/tokenized.py): plan and bench compile the step on
# synthetic batches and skip these too, so they start without seqio and TensorFlow.
DATA_CONFIGURABLES = ("make_stream", "validation_streams", "load_tasks")
OUTSIDE_THE_STEP = LOOP_CONFIGURABLES + DATA_CONFIGURABLES
flags.disclaim_key_flags()  # the gin flags are the command's own: its --help lists them


def define_flags() -> None:
    """Defines --gin_file and --gin_bindings (call once per command, at import)."""
    flags.DEFINE_multi_string("gin_file", [], "gin config file(s), e.g. gin_configs/tiny.gin; "
                              "looked up as given, then in the project's gin_configs/ folder.")
    flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings, e.g. 'TRAIN_STEPS = 10'; "
                              "or use the shorthand --gin.TRAIN_STEPS=10.")


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """Turns each `--gin.NAME=VALUE` into `--gin_bindings=NAME = VALUE` (before absl parses
    argv)."""
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
    """`value` if it is a gin literal or reference (a bare tuple `5,3` in parentheses), else
    `value` quoted as a string."""
    if value.startswith(("@", "%")):
        return value
    try:
        literal = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return repr(value)
    return f"({value})" if isinstance(literal, tuple) and not value.startswith("(") else value


def parse(gin_files: Sequence[str], bindings: Sequence[str] = (),
          skip_unknown: bool | Sequence[str] = False) -> None:
    """Parses config files then bindings, with the configurables registered so far, and checks
    the integer macros (`INT_MACROS`).

    Unknown or misspelled names raise a ValueError here, before any work is done: gin's for a
    configurable or parameter (except the configurables `skip_unknown` names; True: every
    unregistered one), ours for a macro that a binding sets and no config file defines or uses.
    """
    gin.add_config_file_search_path(str(GIN_CONFIGS_DIR))
    gin.add_config_file_search_path(str(GIN_CONFIGS_DIR.parent))
    skip = skip_unknown if isinstance(skip_unknown, bool) else list(skip_unknown)
    files = [str(find_config_file(name)) for name in gin_files]
    gin.parse_config_files_and_bindings(files, None, finalize_config=False, skip_unknown=skip)
    known = _macros(referenced=True)
    gin.parse_config_files_and_bindings(None, list(bindings), skip_unknown=skip)
    for name in sorted(_macros(referenced=False) - known):
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ValueError(f"Unknown macro {name}: no config file defines or uses it.{hint} "
                         f"(The config's macros: {', '.join(sorted(known))}.)")
    check_int_macros()


def find_config_file(name: str) -> pathlib.Path:
    """The gin file `name`, as given or in the project's gin_configs/ folder (or its parent)."""
    for folder in (pathlib.Path(), GIN_CONFIGS_DIR, GIN_CONFIGS_DIR.parent):
        if (folder / name).is_file():
            return folder / name
    choices = ", ".join(sorted(path.name for path in GIN_CONFIGS_DIR.glob("*.gin")))
    raise ValueError(f"--gin_file={name}: no such file here or in {GIN_CONFIGS_DIR}; give a "
                     f"path to a gin file, or one of {choices}.")


def _macros(referenced: bool) -> set[str]:
    """The macros the parsed config binds, and with `referenced` those it uses (`%NAME`).
    (gin lists neither publicly: they are read from its config table.)"""
    table = gin.config._CONFIG  # pylint: disable=protected-access
    names = {scope for scope, selector in table if selector == "gin.macro"}
    if referenced:
        names |= {ref.config_key[0] for ref in gin.config.iterate_references(table)
                  if ref.config_key[1] == "gin.macro"}
    return names


# The integer macros, checked for type and range as soon as a config is parsed, before anything
# is built: name -> (smallest value, an example for the fix, whether None is allowed).
INT_MACROS = {
    "TRAIN_STEPS": (1, "1000", False),
    "BATCH_SIZE": (1, "512", False),
    "SEQUENCE_LENGTH": (1, "2048", False),
    "MICRO_BATCH_SIZE": (1, "4", True),
    "SEED": (0, "42", False),
}


def check_int_macros() -> None:
    """Raises a ValueError naming the first of `INT_MACROS` whose bound value is wrong."""
    for name, (low, example, none_allowed) in INT_MACROS.items():
        value = macro(name, default=_UNBOUND)
        if value is _UNBOUND or isinstance(value, gin.config.ConfigurableReference):
            continue  # not this config's macro, or bound to another macro or configurable
        if not (value is None and none_allowed):
            check_int(name, value, example, low)


_UNBOUND = object()


def check_int(name: str, value: object, example: str, low: int = 1) -> None:
    """Raises a ValueError naming the setting `name` unless `value` is an integer >= `low`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} = {value!r} is not {kind}; set it to one, e.g. "
                         f"--gin.{name}={example}.")


def parse_flags(skip_unknown: bool | Sequence[str] = False, default_file: str | None = None,
                ) -> None:
    """Parses the gin flags of the running command (after absl has parsed argv).

    default_file: the config read when no --gin_file is given (None: --gin_file is required).
    """
    gin_files = flags.FLAGS.gin_file or ([default_file] if default_file else [])
    if not gin_files:
        raise app.UsageError("No --gin_file given; pass one of the configs in "
                             f"{GIN_CONFIGS_DIR}, e.g. --gin_file=gin_configs/tiny.gin.")
    bindings = list(flags.FLAGS.gin_bindings)
    if "data_dir" in flags.FLAGS and flags.FLAGS.data_dir:
        bindings.append(binding("DATA_DIR", flags.FLAGS.data_dir))
    parse(gin_files, bindings, skip_unknown)


def macro(name: str, default: Any = None) -> Any:
    """The value the parsed config binds to the macro `name` (e.g. "DATA_DIR"), else `default`."""
    try:
        return gin.query_parameter(f"{name}/macro.value")
    except ValueError:
        return default


def define_data_dir_flag() -> None:
    """--data_dir, the data commands' shorthand for --gin.DATA_DIR (it is that binding)."""
    flags.DEFINE_string("data_dir", None, "ROOTS-style corpus folder; the same as "
                        "--gin.DATA_DIR=DIR (default: the config's DATA_DIR, else the corpus "
                        "shipped with the package).")


def no_arguments(argv: Sequence[str]) -> None:
    """Raises a usage error for positional arguments (commands take flags only)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")


EXIT_USAGE = 2  # a bad flag or argument
# Errors that describe bad input (a binding, a path, a mesh, a checkpoint): reported as one line.
# gin's own errors are ValueErrors and SyntaxErrors.
REPORTED_ERRORS = (ValueError, SyntaxError, OSError)
# What gin appends to an error raised under it: "\n  In call to configurable 'train' (...)".
_GIN_CONTEXT = re.compile(r"\n  In (?:call to configurable|file|bindings string) ")


def error_line(error: Exception) -> str:
    """The error's own message, without the trail of configurables gin appends to it."""
    return _GIN_CONTEXT.split(str(error), maxsplit=1)[0]


def run(main: Callable[[list[str]], None],
        reported: tuple[type[Exception], ...] = REPORTED_ERRORS,
        exit_codes: Mapping[type[Exception], int] | None = None, gin_flags: bool = True,
        abandoning_threads: tuple[type[Exception], ...] = ()) -> None:
    """Runs a command's `main` under absl with the gin flags (and their --gin.NAME=VALUE form)
    defined and the libraries' INFO chatter filtered from the console.

    A `reported` error ends the command with one line `error: ...` on stderr and exit status 1,
    or the status `exit_codes` gives its class (--verbose: the traceback); a bad flag or
    argument is one such line too, with status 2. gin_flags: False for the commands that read
    no gin config (convert, generate). abandoning_threads: reported errors after which the
    process exits at once, without joining threads that may never end (a failed orbax save's).
    """
    if gin_flags:
        define_flags()
    flags.DEFINE_bool("verbose", False, "On bad input, show the traceback, not just the error.")
    exit_codes = dict(exit_codes or {})
    reported = (*reported, *exit_codes)

    def reporting_main(argv: list[str]) -> None:
        quiet_library_logs()
        try:
            main(argv)
        except app.UsageError as error:
            _exit_with_error(f"{error} (--help lists the flags)", EXIT_USAGE)
        except reported as error:
            if flags.FLAGS.verbose:
                raise
            _exit_with_error(f"{error_line(error)} (--verbose shows the traceback)",
                             next((code for kind, code in exit_codes.items()
                                   if isinstance(error, kind)), 1),
                             at_once=isinstance(error, abandoning_threads))

    app.run(reporting_main, flags_parser=_parse_argv)


_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def _parse_argv(argv: list[str]) -> list[str]:
    """absl's parse of argv (after the --gin.NAME=VALUE rewrite); a bad flag is one line, and a
    help request exits 0 (absl's exits 1)."""
    try:
        return flags.FLAGS(rewrite_gin_args(argv))
    except flags.Error as error:
        _exit_with_error(f"{error} (--help lists the flags)", EXIT_USAGE)
    except SystemExit:
        if any(arg in _HELP_FLAGS for arg in argv[1:]):
            sys.exit(0)
        raise


def _exit_with_error(message: str, code: int, at_once: bool = False) -> None:
    print(f"error: {message}", file=sys.stderr)
    if at_once:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# Libraries whose INFO lines would drown the commands' own (orbax logs every file it writes).
_CHATTY_LIBRARIES = ("/orbax/", "/jax/_src/xla_bridge.py")


class _QuietLibraries(py_logging.Filter):
    """Drops the chatty libraries' records below WARNING, and gin's lookups of include paths."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if "/gin/resource_reader.py" in record.pathname:
            return False  # "Path not found" while gin tries each search path in turn
        chatty = any(part in record.pathname for part in _CHATTY_LIBRARIES)
        return record.levelno >= py_logging.WARNING or not chatty


def quiet_library_logs() -> None:
    """Keeps the console to the command's lines (and every library's warnings and errors).

    Call it after absl has set up logging (inside `app.run`'s main): the filter goes on the
    root handlers, which every library's records reach.
    """
    for handler in py_logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())
