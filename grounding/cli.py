"""The command line of every method: ``grounding-train`` and ``grounding-eval`` (``train.py`` / ``eval.py``).

One subclass-mode LightningCLI: a config names its LightningModule and its LightningDataModule
(``model: {class_path: ..., init_args: ...}``, the same for ``data``), so a new method plugs in by its
config alone. Every constructor argument is a flag (``--model.lr 1e-4``, ``--data.batch_size 4``,
``--trainer.devices 2``); ``--config FILE`` loads YAML. Without any ``--config`` the demo config
``configs/image/synthetic.yaml`` is used; with one, only the files given apply. A config is looked up as
given, then among the configs shipped inside the package (``--config image/coco.yaml`` or
``--config configs/image/coco.yaml`` work from any folder, also with a non-editable install).

Every run also gets ``--checkpoint.*`` (``LastCheckpoint``: last.ckpt at every epoch end, at the end of fit
and on SIGTERM/SIGUSR1), ``--progress.*`` (plain progress lines when the output is not a terminal) and
atomic checkpoint writes (``grounding.lightning.callbacks``).

- ``train``: evaluates the untrained model (``--validate_before_fit``), fits, evaluates the trained model
  (the validation of fit's last step when there was one: the same weights), prints one JSON line
  ``{"untrained": {...}, "trained": {...}, "run_dir": ..., "steps": ...}``.
- ``evaluate``: ``Trainer.test`` of any method on its DataModule's evaluation split (``--data.split``),
  prints ``{"split": ..., <metrics>, "run_dir": ...}``. Undefined metrics are printed as ``null``.
- ``predict`` (``grounding-predict``): ``Trainer.predict`` of the detector, GEM, InvSeg or MaskInversion on the
  user's images (``--inputs``, ``--classes`` / ``--text``, MaskInversion's ``--masks`` / ``--boxes``), or of MIMIC
  on target texts (``--classes``; ``grounding.data.image_folder``), outputs written by
  ``grounding.lightning.prediction_writer``, prints ``{"out": ..., "images": ..., "predicted": ...,
  "skipped_existing": ..., "unreadable": ..., "run_dir": ...}``.

The command line as a user meets it:

- stdout holds only that JSON line; everything else (progress bars, model summary, Lightning's messages) goes
  to stderr.
- ``--help`` ends with the settings of the config's own model and data classes (the demo config's without
  ``--config``), their defaults being the config's values.
- A bad setting is one line on stderr, ``PROG: error: --data.batch_size: expected int, got 'zero'``, and exit
  status 2: unknown or abbreviated flags (``--trainer.max_step`` is not ``--trainer.max_steps``), values of
  the wrong type, a value a constructor refuses (its ``ValueError``, or ``OSError`` for a file or hub id it
  cannot read), a missing or malformed ``--config`` file (checked before lightning is imported: a fraction of
  a second), ``--optimizer`` / ``--lr_scheduler`` for a module that configures its own optimizers (every
  module here: they would silently replace its parameter groups and schedule), and a ``--ckpt_path`` that
  holds another LightningModule class than the config builds. ``JSONARGPARSE_DEBUG=true`` gives the full
  jsonargparse errors and tracebacks instead.
- ``grounding-eval`` of a trainable module without ``--ckpt_path`` warns that it scores the weights the
  module is built with, not trained ones.

A run interrupted by SIGTERM/SIGUSR1 exits with status 128 + signal (143 / 138) after writing last.ckpt.

lightning (about 5-10 s to import) is imported on first need: ``_define_classes`` defines the classes built
on it (``GroundingCLI``, ``GroundingArgumentParser``) as module globals, also when looked up by name
(``from grounding.cli import GroundingCLI``, unpickling in a spawned process).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import json
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import yaml

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger(__name__)

#: the configs shipped with the package (in a checkout, the repository's configs/ folder)
CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "image/synthetic.yaml"

#: ``ckpt_path`` values that Lightning resolves itself (not files)
SPECIAL_CHECKPOINTS = ("best", "last", "hpc", "registry")

#: the classes defined by ``_define_classes`` (they need lightning)
_LAZY_CLASSES = ("GroundingArgumentParser", "GroundingCLI", "_LastValidation")


def __getattr__(name: str) -> Any:
    if name in _LAZY_CLASSES:
        _define_classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------- the command line itself
def find_config(name: str) -> str:
    """``name`` if it is a file, else the packaged config of that name (with or without "configs/")."""
    path = Path(name)
    if path.is_file():
        return name
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    for candidate in (CONFIG_ROOT / name, CONFIG_ROOT.joinpath(*parts) if parts else None):
        if candidate is not None and candidate.is_file():
            return str(candidate)
    return name  # reported by config_problem


def resolve_arguments(args: list[str] | None) -> list[str]:
    """The command line with every ``--config`` / ``-c`` resolved, and the demo config first when none is given."""
    args = list(sys.argv[1:] if args is None else args)
    resolved, given = [], False
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in ("--config", "-c") and index + 1 < len(args):
            resolved += [arg, find_config(args[index + 1])]
            given, index = True, index + 2
            continue
        if arg.startswith("--config="):
            resolved.append("--config=" + find_config(arg.split("=", 1)[1]))
            given = True
        else:
            resolved.append(arg)
        index += 1
    return resolved if given else ["--config", str(CONFIG_ROOT / DEFAULT_CONFIG), *resolved]


def config_values(args: list[str]) -> list[str]:
    """The values of every ``--config`` / ``-c`` of a command line, in order."""
    values = []
    for index, arg in enumerate(args):
        if arg in ("--config", "-c") and index + 1 < len(args):
            values.append(args[index + 1])
        elif arg.startswith("--config="):
            values.append(arg.split("=", 1)[1])
    return values


def _yaml_reason(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def config_problem(value: str) -> str | None:
    """Why ``--config value`` cannot be used, or None: a file that is missing, unreadable, not YAML or not a
    mapping of settings. A value that is not a file may be a config string (``--config 'trainer: {...}'``)."""
    path = Path(value)
    if path.is_dir():
        return f"--config {value}: a folder, not a config file"
    if not path.is_file():
        with contextlib.suppress(yaml.YAMLError):
            if isinstance(yaml.safe_load(value), dict):
                return None  # a config given inline
        return (f"--config {value}: no such file (looked for it as given and among the packaged configs in "
                f"{CONFIG_ROOT}, e.g. --config {DEFAULT_CONFIG})")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        return f"--config {value}: not valid YAML: {_yaml_reason(error)}"
    except (OSError, UnicodeDecodeError) as error:
        return f"--config {value}: cannot be read: {error}"
    if content is None:
        return f"--config {value}: the file is empty"
    if not isinstance(content, dict):
        return f"--config {value}: expected a mapping of settings (model:, data:, trainer:, ...), got a {type(content).__name__}"
    return None


def _program() -> str:
    return Path(sys.argv[0]).name or "grounding"


def exit_with_error(message: str, prog: str | None = None) -> None:
    """``PROG: error: MESSAGE`` on stderr, exit status 2 (argparse's convention for a bad command line)."""
    sys.stderr.write(f"{prog or _program()}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def _debug() -> bool:
    """jsonargparse's switch for full errors and tracebacks."""
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() == "true"


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ------------------------------------------------------------------------------------------ one-line errors
_NONE_REASON = "Expected a <class 'NoneType'>"
_SKIPPED_LINES = ("Does not validate against any of the Union subtypes", "Subtypes:", "Given value type:")


def _blocks(lines: list[str]) -> list[tuple[str, list[str]]]:
    """Indented lines as (head, lines under it) pairs, the heads being the least indented lines."""
    lines = [line for line in lines if line.strip()]
    if not lines:
        return []
    base = min(len(line) - len(line.lstrip()) for line in lines)
    blocks: list[tuple[str, list[str]]] = []
    for line in lines:
        if len(line) - len(line.lstrip()) == base or not blocks:
            blocks.append((line.strip(), []))
        else:
            blocks[-1][1].append(line)
    return blocks


def _failures(lines: list[str], keys: tuple[str, ...] = (), class_path: str | None = None) -> list[tuple]:
    """The leaves of a jsonargparse error: (keys, class path, reason, given value), where ``keys`` holds
    "init_args" where a class was entered."""
    found: list[tuple] = []
    given = None
    for head, body in _blocks(lines):
        if head.startswith("Given value:"):
            given = head.split(":", 1)[1].strip()
    for head, body in _blocks(lines):
        head = head[2:] if head.startswith("- ") else head
        key = re.fullmatch(r'Parser key "(.+)":', head)
        problem = re.fullmatch(r"Problem with given class_path '(.+)':", head)
        if key:
            found += _failures(body, keys + (key[1],), class_path) or [(keys + (key[1],), class_path, "invalid value", given)]
        elif problem:
            found += _failures(body, keys + ("init_args",), problem[1])
        elif head == "Errors:":
            found += [(k, c, r, g or given) for k, c, r, g in _failures(body, keys, class_path)]
        elif not head.startswith(_SKIPPED_LINES) and not head.startswith("Given value:"):
            found.append((keys, class_path, " ".join([head, *(line.strip() for line in body)]), given))
    return found


def _flag(keys: tuple[str, ...]) -> str:
    """The command-line flag of a key path; ``--model.X`` / ``--data.X`` for the method's own classes."""
    keys = tuple(keys)
    if keys[:1] in (("model",), ("data",)) and keys[1:2] == ("init_args",):
        keys = keys[:1] + keys[2:]
    return "--" + ".".join(keys) if keys else ""


def _reason(text: str, given: str | None) -> str:
    """A jsonargparse reason in plain words."""
    restricted = re.fullmatch(r"Not of type (\w+): (.*) does not conform to restriction (.*)", text)
    if restricted:
        return f"{restricted[2]} is not a {restricted[1]} ({restricted[3]})"
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    text = re.sub(r"Expected a typing\.Literal\[(.*)\]", r"expected one of \1", text)
    text = re.sub(r"^Expected an? ", "expected ", text)
    match = re.fullmatch(r"(.*)\. Got value: (.*)", text, flags=re.S)
    if match:
        return f"{match[1]}, got {match[2]!r}"
    if given is not None and text.startswith("expected ") and not given.startswith(("NestedArg(", "{", "Namespace(")):
        return f"{text}, got {given!r}"
    return text


def _parameters(class_path: str | None) -> list[str]:
    try:
        return [name for name in inspect.signature(_import(class_path)).parameters if name not in ("args", "kwargs")]
    except Exception:  # noqa: BLE001 - suggestions are a courtesy
        return []


def explain_parse_error(message: str, options: Iterable[str] = ()) -> str:
    """One line for a jsonargparse parse error: the flag of the setting and the reason, without the dump of
    the Union subtypes tried. ``options``: the parser's flags, for a "did you mean" on an unknown one."""
    found = _failures(message.splitlines())
    if not found:
        return message.strip()
    failures = [f for f in found if f[2] != _NONE_REASON] or found
    failures = [f for f in failures if f[1]] or failures  # inside the class the user gave, when there is one
    keys, class_path = failures[0][0], failures[0][1]
    reasons, values = [], []
    for reason in (_reason(r, given) for k, c, r, given in failures if (k, c) == (keys, class_path)):
        expected = re.fullmatch(r"(expected .*), got (.*)", reason, flags=re.S)
        if expected:  # the alternatives of a Union: "expected A or B, got X"
            reason = expected[1] if not reasons else expected[1].removeprefix("expected ")
            values += [expected[2]] if expected[2] not in values else []
        if reason not in reasons:
            reasons.append(reason)
    if len(values) == 1:
        reasons[-1] += f", got {values[0]}"
    unknown = re.fullmatch(r"Option '(.+)' is not accepted", reasons[0])
    if unknown and class_path:
        flag = _flag(keys + (unknown[1],))
        close = difflib.get_close_matches(unknown[1], _parameters(class_path), n=1, cutoff=0.75)
        hint = f"; did you mean {_flag(keys + (close[0],))}?" if close else ""
        return f"{flag}: {class_path.rsplit('.', 1)[-1]} has no such setting{hint}"
    unrecognized = re.fullmatch(r"unrecognized arguments: (\S+).*", reasons[0], flags=re.S)
    if unrecognized and unrecognized[1].startswith("-"):
        close = difflib.get_close_matches(unrecognized[1].split("=", 1)[0], list(options), n=1, cutoff=0.75)
        return reasons[0] + (f" (did you mean {close[0]}?)" if close else "")
    flag = _flag(keys)
    return f"{flag}: {' or '.join(reasons)}" if flag else " or ".join(reasons)


class _BuildFailure(BaseException):
    """A constructor's exception on its way out of jsonargparse (which would turn it into a Union error)."""

    def __init__(self, class_type: type, error: Exception):
        super().__init__(class_type, error)
        self.class_type, self.error = class_type, error


class _ReportingInstantiator:
    """An instantiator that lets a constructor's exception reach ``GroundingCLI`` as a ``_BuildFailure``."""

    def __init__(self, inner=None):
        self.inner = inner
        self.links = inner is not None and "applied_instantiation_links" in inspect.signature(inner).parameters

    def __call__(self, class_type: type, *args, applied_instantiation_links: dict | None = None, **kwargs):
        if self.links:
            kwargs["applied_instantiation_links"] = applied_instantiation_links or {}
        try:
            return self.inner(class_type, *args, **kwargs) if self.inner is not None else class_type(*args, **kwargs)
        except Exception as error:
            raise _BuildFailure(class_type, error) from None


# ------------------------------------------------------------------------------------ --help: the config's classes
def config_sections(args: list[str]) -> dict[str, tuple[str, dict, str]]:
    """``{"model": (class path or name, init args, where from), "data": ...}`` as a command line's configs
    give them (later ones win) and ``--model CLASS`` / ``--data CLASS`` override them."""
    options = ("--config", "-c", "--model", "--data", "--model.class_path", "--data.class_path")
    given, index = [], 0
    while index < len(args):
        option, equals, value = args[index].partition("=")
        if equals and option in options:
            given.append((option, value))
        elif args[index] in options and index + 1 < len(args):
            given.append((args[index], args[index + 1]))
            index += 1
        index += 1
    sections: dict[str, tuple[str, dict, str]] = {}
    for option, value in given:
        if option in ("--config", "-c"):
            try:
                content = yaml.safe_load(Path(value).read_text() if Path(value).is_file() else value)
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                continue
            for key in ("model", "data"):
                entry = content.get(key) if isinstance(content, dict) else None
                if isinstance(entry, dict) and entry.get("class_path"):
                    sections[key] = (entry["class_path"], dict(entry.get("init_args") or {}), value)
                elif isinstance(entry, dict) and key in sections and isinstance(entry.get("init_args"), dict):
                    sections[key] = (sections[key][0], {**sections[key][1], **entry["init_args"]}, value)
        elif not value.startswith("-") and Path(value).suffix.lower() not in (".yaml", ".yml", ".json") \
                and not value.lstrip().startswith("{"):  # a class (path or name), not a config of the section
            sections[option[2:].split(".")[0]] = (value, {}, "the command line")
    return sections


def class_help(parser, key: str, class_path: str, init_args: dict, source: str) -> str:
    """The help of one section's class (what ``--KEY.help CLASS`` prints), defaults set to the config's values."""
    from jsonargparse import ArgumentParser

    action = next((a for a in parser._actions if a.dest == f"{key}.help"), None)
    try:
        if action is not None and hasattr(action, "resolve_help_type"):
            cls = action.resolve_help_type(class_path, f"--{key}.help")
        else:
            cls = _import(class_path)
        sub = ArgumentParser(prog=parser.prog, usage=argparse.SUPPRESS, add_help=False, exit_on_error=False)
        sub.add_class_arguments(cls, key, **dict(getattr(action, "sub_add_kwargs", None) or {"fail_untyped": False}))
    except Exception as error:  # noqa: BLE001 - the rest of the help stands
        return f"\n--{key} {class_path} (from {source}): its settings cannot be shown: {error}\n"
    for name, value in init_args.items():
        with contextlib.suppress(Exception):
            sub.set_defaults({f"{key}.{name}": value})
    defaults = "the config's values" if init_args else "the class's own"
    header = (f"\nThe {key} of this command line: {_class_path(cls)} (from {source}); every setting below is "
              f"--{key}.NAME VALUE, the defaults shown are {defaults}:\n")
    return header + sub.format_help()


# ---------------------------------------------------------------------------------- checks before building
def checkpoint_class_path(path: str | Path) -> str | None:
    """The LightningModule class a Lightning checkpoint was saved from (LightningCLI keeps it in the
    hyper-parameters as ``_class_path``), or None where the checkpoint does not say or cannot be read here.
    The file is read safely (``grounding.checkpoints``): one holding other objects than tensors, plain values
    and the package's settings classes is not unpickled (None; ``checkpoint_problem`` names them)."""
    from grounding.checkpoints import UnsafeCheckpointError, saved_class_path

    try:
        return saved_class_path(path)
    except UnsafeCheckpointError:
        return None


def _same_class(class_path: str, cls: type) -> bool:
    if class_path == _class_path(cls):
        return True
    try:
        return _import(class_path) is cls
    except Exception:  # noqa: BLE001 - moved or renamed since: compare the names
        return class_path.rsplit(".", 1)[-1] == cls.__name__


def _parent_class(class_path: str, cls: type) -> bool:
    """Whether ``class_path`` names a parent class of ``cls``: its weights are the parent's (an
    ``ImageGroundingModule`` checkpoint evaluated by ``GroundingModule`` on referring expressions); a subclass
    with weights of its own is refused by Lightning's strict loading, naming the missing keys."""
    try:
        held = _import(class_path)
    except Exception:  # noqa: BLE001 - not importable: not a parent
        return False
    return isinstance(held, type) and held is not cls and issubclass(cls, held)


def checkpoint_problem(ckpt_path: str | None, cls: type) -> str | None:
    """Why ``--ckpt_path`` does not fit the LightningModule class ``cls``, or None: also a file that holds
    objects the safe loader refuses (``grounding.checkpoints``), found before anything of it is unpickled."""
    if not ckpt_path or ckpt_path in SPECIAL_CHECKPOINTS or ckpt_path.startswith("registry:") or "://" in ckpt_path:
        return None
    if not Path(ckpt_path).is_file():
        return f"--ckpt_path {ckpt_path}: no such file"
    from grounding.checkpoints import UnsafeCheckpointError, saved_class_path

    try:
        held = saved_class_path(ckpt_path)
    except UnsafeCheckpointError as error:
        return f"--ckpt_path {error}"
    if held is None or _same_class(held, cls) or _parent_class(held, cls):
        return None
    return (f"--ckpt_path {ckpt_path} is a checkpoint of {held.rsplit('.', 1)[-1]} ({held}), but the config builds "
            f"{cls.__name__} ({_class_path(cls)}): give the config it was trained with (RUN/config.yaml)")


def optimizer_problem(config, cls: type) -> str | None:
    """``--optimizer`` / ``--lr_scheduler`` given for a module that configures its own optimizers, or None."""
    import lightning as L

    given = [f"--{key}" for key in ("optimizer", "lr_scheduler") if config.get(key) is not None]
    if not given or getattr(cls, "configure_optimizers", None) is L.LightningModule.configure_optimizers:
        return None
    return (f"{' / '.join(given)}: {cls.__name__} defines its own optimizer and schedule (configure_optimizers), "
            f"which {'these' if len(given) > 1 else 'this'} would replace; set them with its --model.* settings "
            "(--help lists them)")


# --------------------------------------------------------------------------------- the lightning-based classes
def _define_classes() -> None:
    """Define ``GroundingArgumentParser``, ``GroundingCLI`` and ``_LastValidation`` (module globals)."""
    global GroundingArgumentParser, GroundingCLI, _LastValidation
    if "GroundingCLI" in globals():
        return
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.plugins.io import CheckpointIO
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from grounding.lightning.callbacks import AtomicCheckpointIO, LastCheckpoint, TextProgress

    class GroundingArgumentParser(LightningArgumentParser):
        """LightningCLI's parser: one-line errors, and a ``--help`` that ends with the config's classes."""

        #: the main parser's command line (``GroundingCLI.parse_arguments``); None for the parsers jsonargparse
        #: makes inside (class help, nested classes), which keep jsonargparse's own behaviour
        command_line: list[str] | None = None

        def error(self, message: str, ex: Exception | None = None):
            if self.command_line is None or not self.exit_on_error or _debug():
                super().error(message, ex)
            exit_with_error(explain_parse_error(message, list(self._option_string_actions)), self.prog)

        def format_help(self, *args, **kwargs) -> str:
            text = super().format_help(*args, **kwargs)
            if self.command_line is None:
                return text
            sections = config_sections(self.command_line)
            return text + "".join(class_help(self, key, *sections[key]) for key in ("model", "data") if key in sections)

        def add_instantiator(self, instantiator, class_type, subclasses: bool = True, prepend: bool = False) -> None:
            super().add_instantiator(_ReportingInstantiator(instantiator), class_type, subclasses=subclasses, prepend=prepend)

    class GroundingCLI(LightningCLI):
        """LightningCLI with the entry points' own options, the callbacks every run gets and the checks above."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--ckpt_path", type=str | None, default=None, help="checkpoint to resume (train) or evaluate (eval)")
            parser.add_argument("--validate_before_fit", type=bool, default=True, help="train: evaluate the untrained model first")
            parser.add_lightning_class_args(LastCheckpoint, "checkpoint")
            parser.add_lightning_class_args(TextProgress, "progress")

        def parse_arguments(self, parser, args) -> None:
            parser.command_line = list(sys.argv[1:] if args is None else args)
            super().parse_arguments(parser, args)

        def before_instantiate_classes(self) -> None:
            model = self.config.get("model")
            if model is not None and model.get("class_path"):
                model_class = _import(model.class_path)
                problem = optimizer_problem(self.config, model_class) or checkpoint_problem(self.config.get("ckpt_path"), model_class)
                if problem:
                    exit_with_error(problem, self.parser.prog)
            if hasattr(LightningArgumentParser, "add_instantiator"):  # constructor errors of the callbacks too
                self.parser.add_instantiator(None, L.Callback)

        def instantiate_classes(self) -> None:
            failure = None
            with contextlib.redirect_stdout(sys.stderr):
                try:
                    super().instantiate_classes()
                except _BuildFailure as caught:
                    failure = caught
            if failure is None:
                return
            error, name = failure.error, failure.class_type.__name__
            if isinstance(error, (ValueError, OSError)) and not _debug():  # a setting the constructor refused, and why
                section = next((f"--{key} " for key, base in (("model", L.LightningModule), ("data", L.LightningDataModule))
                                if issubclass(failure.class_type, base)), "")
                exit_with_error(f"{section}({name}): {error}" if section else f"{name}: {error}", self.parser.prog)
            raise error

        def instantiate_trainer(self, **kwargs):
            trainer_config = self._get(self.config_init, "trainer", default={})
            plugins = trainer_config.get("plugins") or []
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):  # atomic writes unless the user chose
                kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
            callbacks = trainer_config.get("callbacks") or []
            if trainer_config.get("logger") is False and any(isinstance(c, LearningRateMonitor) for c in callbacks):
                # Lightning refuses a LearningRateMonitor without a logger; --trainer.logger false means "log nothing"
                trainer_config["callbacks"] = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
                log.info("--trainer.logger false: the config's LearningRateMonitor is left out")
            if trainer_config.get("enable_progress_bar") is None:  # a bar only on a terminal; TextProgress otherwise
                kwargs.setdefault("enable_progress_bar", sys.stderr.isatty())
            try:
                return super().instantiate_trainer(**kwargs)
            except (MisconfigurationException, ValueError) as error:
                if _debug():
                    raise
                message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            exit_with_error(f"--trainer: {message}", self.parser.prog)

    class _LastValidation(L.Callback):
        """The metrics of the last validation inside ``fit`` and the step it ran at."""

        def __init__(self):
            self.step, self.metrics = None, {}

        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if not trainer.sanity_checking:
                self.step = trainer.global_step
                self.metrics = metrics_line("val/", [{k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}])


def build_cli(args: list[str] | None = None) -> GroundingCLI:
    """The parsed command line with model, data module and trainer instantiated (nothing run yet).

    args: the arguments (default: the command line's). From the command line, ``sys.argv`` itself gets the
    resolved arguments: Lightning's DDP launcher starts the other processes with it. A bad command line exits
    with status 2 after one line on stderr (``SystemExit(2)`` in-process).
    """
    resolved = resolve_arguments(args)
    if args is None:
        sys.argv[1:] = resolved
    for value in config_values(resolved):  # before lightning is imported: a typo answers at once
        problem = config_problem(value)
        if problem:
            exit_with_error(problem)
    _define_classes()
    import lightning as L
    import torch

    # CPU arithmetic on denormal floats (|x| < 1.2e-38, e.g. softmax tails of sharpening attention) can be
    # many times slower; flushing them to zero changes no result that matters (BENCHMARKS.md). GPUs: no effect.
    torch.set_flush_denormal(True)
    return GroundingCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=None if args is None else resolved,
        parser_class=GroundingArgumentParser,
        parser_kwargs={"allow_abbrev": False},
        save_config_kwargs={"overwrite": True},
    )


# ------------------------------------------------------------------------------------------------------ runs
def metrics_line(prefix: str, metrics: list[dict]) -> dict:
    """The ``split/AP..`` values of a Trainer.validate/test result, as plain floats (None where undefined)."""
    merged = {k: float(v) for result in metrics for k, v in result.items()}
    return {k.split("/", 1)[1]: (None if math.isnan(v) else round(v, 4)) for k, v in merged.items() if k.startswith(prefix)}


def finish_distributed(barrier: bool = True) -> None:
    """End the process group that the DDP strategy left open (every rank calls this at the end of a run).

    Lightning keeps the group after ``fit``/``test``; left to interpreter shutdown, gloo's threads were
    sometimes destroyed while running ("terminate called without an active exception", exit -6).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def _run() -> Iterator[None]:
    """An interrupted run exits non-zero (128 + signal); the process group is always closed. Whatever the run
    prints goes to stderr: stdout is for the summary line alone."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from grounding.lightning.callbacks import interruption_exit_code

    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except SIGTERMException:  # Lightning's own stop on SIGTERM is a SystemExit with status 0
        finish_distributed(barrier=False)
        raise SystemExit(interruption_exit_code()) from None
    except BaseException:
        with contextlib.suppress(Exception):
            finish_distributed(barrier=False)
        raise
    finish_distributed()


def print_json(payload: dict, file=None) -> None:
    print(json.dumps(payload), file=file or sys.stdout, flush=True)


def fix_logger_versions(trainer: L.Trainer) -> None:
    """Resolve the loggers' versions before a spawning strategy (``ddp_spawn``) copies them into its workers.

    A TensorBoard logger picks its version (the next free ``version_N``) the first time it is asked. Under
    ``ddp_spawn`` the workers ask first and write to ``version_N``; the main process, asked afterwards for
    ``trainer.log_dir``, would see that folder and answer ``version_N+1``, an empty folder. Asking here, in the
    main process before the spawn, gives the workers and the main process the same version. Launchers that
    start the script once per process (``ddp``) already agree through rank 0 and are left alone.
    """
    if getattr(trainer.strategy, "_start_method", None) in ("spawn", "fork", "forkserver"):
        for logger in trainer.loggers:
            _ = logger.version


def train(args: list[str] | None = None) -> dict:
    """Fit a method (see the module docstring); returns the printed summary."""
    cli = build_cli(args)  # first: a bad command line is reported before lightning is imported
    from lightning.pytorch.utilities.model_helpers import is_overridden

    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    fix_logger_versions(trainer)
    if not is_overridden("training_step", model):
        raise SystemExit(f"{type(model).__name__} has no training step (a test-time method): run grounding-eval with this config")
    validates = is_overridden("validation_step", model)
    stdout = sys.stdout
    with _run():
        before = {}
        if validates and cli.config.validate_before_fit and cli.config.ckpt_path is None:
            before = metrics_line("val/", trainer.validate(model, datamodule=data, verbose=False))
        last_validation = _LastValidation()
        trainer.callbacks.append(last_validation)
        trainer.fit(model, datamodule=data, ckpt_path=cli.config.ckpt_path, weights_only=True)
        after = {}
        if validates and last_validation.step == trainer.global_step:  # fit ended with a validation: same weights
            after = last_validation.metrics
        elif validates:
            after = metrics_line("val/", trainer.validate(model, datamodule=data, verbose=False))
        run_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
        summary = {"untrained": before, "trained": after, "run_dir": run_dir, "steps": trainer.global_step}
        if trainer.is_global_zero:
            print_json(summary, stdout)
    return summary


def evaluate(args: list[str] | None = None) -> dict:
    """``Trainer.test`` of any method on its evaluation split; returns the printed metrics."""
    cli = build_cli(args)  # first: a bad command line is reported before lightning is imported
    from lightning.pytorch.utilities.model_helpers import is_overridden

    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    fix_logger_versions(trainer)
    if cli.config.ckpt_path is None and is_overridden("training_step", model) and trainer.is_global_zero:
        log.warning(f"no --ckpt_path: {type(model).__name__} is trainable, and is scored with the weights it is "
                    "built with (random or pretrained), not trained ones")
    stdout = sys.stdout
    with _run():
        metrics = metrics_line("test/", trainer.test(model, datamodule=data, ckpt_path=cli.config.ckpt_path, verbose=False, weights_only=True))
        run_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
        split = getattr(data, "evaluation_split", None)
        if trainer.is_global_zero:
            print_json({"split": split, **metrics, "run_dir": run_dir}, stdout)
    return {"split": split, **metrics, "run_dir": run_dir}


# ------------------------------------------------------------------------------------------------- predict
#: the LightningModules grounding-predict runs on the user's images (class names, for the error of another)
PREDICT_MODULES = ("ImageGroundingModule", "GEMSegmentationModule", "InvSegModule", "MaskInversionModule", "MimicModule")
#: those among them that synthesize images from target texts (--classes) instead of reading images
SYNTHESIS_MODULES = ("MimicModule",)
IMAGE_FOLDER_DATA = "grounding.data.image_folder.ImageFolderDataModule"
TARGET_TEXT_DATA = "grounding.data.image_folder.TargetTextDataModule"


def predict_parser() -> argparse.ArgumentParser:
    """The options of ``grounding-predict`` besides the config's (``--trainer.*``, ``--model.*``, ``--ckpt_path``)."""
    parser = argparse.ArgumentParser(
        prog=_program(), add_help=False, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --config CONFIG [--ckpt_path CKPT] --inputs PATH [PATH ...] --classes 'a, b' | --text '...' [options]",
        description="Run a method on your own images (MIMIC: on target texts); per image a JSON record and pictures\n"
                    "in --out, predictions.json at the end. The config says which method (configs/image, gem, invseg,\n"
                    "maskinversion, mimic); the Trainer's options (--trainer.devices 4 ...) spread the images over devices.",
        epilog="examples:\n"
               "  grounding-predict --config gem/voc.yaml --inputs photos/ --classes 'background, cat, dog' --out preds/\n"
               "  grounding-predict --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt --inputs photos/ \\\n"
               "      --text 'the dog on the left . a red ball' --box_threshold 0.3\n"
               "  grounding-predict --config maskinversion/voc.yaml --inputs photos/ --masks masks/ --classes 'cat, dog'\n"
               "  grounding-predict --config mimic/llava.yaml --classes 'a red circle, a blue square'\n\n"
               "The settings of the config's classes follow (--model.*, --trainer.*, --ckpt_path); --data is set by\n"
               "the options above.",
    )
    parser.add_argument("--inputs", nargs="+", default=None, metavar="PATH",
                        help="image files, folders (their images, sorted) and .txt files listing image paths")
    parser.add_argument("--classes", default=None, help="class names separated by commas: 'red circle, blue square' "
                        "(a class 'background' is the background class of the segmentation methods); MIMIC: the target texts")
    parser.add_argument("--text", default=None, help="detector: a free prompt, 'the red circle . a blue square'; "
                        "MIMIC: the question (default 'What is in the image?')")
    parser.add_argument("--masks", default=None, metavar="DIR", help="MaskInversion: the regions, DIR/<image id>.png "
                        "(each non-zero value a region) or DIR/<image id>/<region>.png (binary masks)")
    parser.add_argument("--boxes", default=None, metavar="FILE", help="MaskInversion: the regions as pixel boxes, "
                        "a JSON file {image id: [[x0, y0, x1, y1], ...]}")
    parser.add_argument("--out", default=None, help="output folder (default RUN/predictions); its complete outputs are not redone")
    parser.add_argument("--recursive", action="store_true", help="read the sub-folders of a folder too")
    parser.add_argument("--redo", action="store_true", help="predict every image again, also those with complete outputs")
    parser.add_argument("--batch_size", type=int, default=1, help="images per step of each process")
    parser.add_argument("--num_workers", type=int, default=0, help="loader processes of each process reading and "
                        "decoding the images (0: in the loop)")
    parser.add_argument("--no_pictures", action="store_true", help="write only the records and the data files (label "
                        "PNGs, embeddings): no drawn boxes, overlays, heatmaps or maps")
    parser.add_argument("--writer_threads", type=int, default=None, help="threads of each process drawing, encoding "
                        "and writing the outputs while the model runs (0: in the loop; default: half the CPUs of each "
                        "process of the machine, 2 to 8)")
    parser.add_argument("--box_threshold", type=float, default=0.35, help="detector: keep boxes scoring above this")
    parser.add_argument("--text_threshold", type=float, default=0.25, help="detector: token probability for a --text label")
    parser.add_argument("--top_k", type=int, default=None, help="detector: at most this many boxes per image")
    parser.add_argument("--every_class", action="store_true", help="detector with --classes: score every (box, class) "
                        "pair as the COCO evaluation does (a box may come out once per class) instead of once per box")
    parser.add_argument("--predict.image_size", dest="image_size", type=int, default=None,
                        help="detector: shorter side of the resized image (default: the config's data.image_size, else 800)")
    parser.add_argument("--predict.max_size", dest="max_size", type=int, default=None,
                        help="detector: cap of the longer side (default: the config's data.max_size, else 1333)")
    parser.error = lambda message: exit_with_error(message)  # type: ignore[method-assign]
    return parser


def predict_arguments(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the predict options, the command line for ``build_cli``: the config's data replaced by the images, or by
    the target texts for an image-synthesis method)."""
    parser = predict_parser()
    asks_help = "--help" in args or "-h" in args
    if asks_help:
        sys.stdout.write(parser.format_help() + "\n")
    options, rest = parser.parse_known_args(args)
    given_data = [arg.split("=", 1)[0] for arg in rest if arg == "--data" or arg.startswith("--data.")]
    if given_data:
        exit_with_error(f"{given_data[0]}: grounding-predict reads the images of --inputs (and --classes, --text, "
                        "--masks / --boxes, --out, --batch_size); the detector's resize is --predict.image_size / "
                        "--predict.max_size")
    resolved = resolve_arguments(rest)
    method = config_sections(resolved).get("model", ("",))[0].rsplit(".", 1)[-1]
    synthesis = method in SYNTHESIS_MODULES
    if synthesis and options.inputs is not None:
        exit_with_error(f"--inputs: {method} synthesizes images from the target texts of --classes; it reads no images")
    if options.inputs is None and not synthesis and not asks_help:
        exit_with_error("--inputs: give the images to predict (files, folders or .txt lists of paths)")
    from grounding.data.image_folder import parse_classes

    try:
        classes = parse_classes(options.classes)
    except ValueError as error:
        exit_with_error(str(error))
    common = {"classes": classes, "text": options.text, "out_dir": options.out, "skip_existing": not options.redo,
              "batch_size": options.batch_size, "num_workers": options.num_workers}
    if synthesis:
        data, data_class = common, TARGET_TEXT_DATA
    else:
        data = {"inputs": options.inputs or ["."], **common, "masks": options.masks, "boxes": options.boxes,
                "recursive": options.recursive}
        data_class = IMAGE_FOLDER_DATA
    flags = [f"--data.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in data.items() if v is not None]
    return options, [*resolved, "--data", data_class, *flags]


def predict_problem(method: str, options: argparse.Namespace) -> None:
    """Exit with the error of options that ``method`` (a LightningModule class name) cannot take."""
    if method not in PREDICT_MODULES:
        exit_with_error(f"grounding-predict does not run {method} yet; it runs {', '.join(PREDICT_MODULES)} "
                        "(configs/image, configs/gem, configs/invseg, configs/maskinversion, configs/mimic)")
    regions = options.masks is not None or options.boxes is not None
    if (method == "MaskInversionModule") != regions:
        exit_with_error("--masks / --boxes: MaskInversion needs the regions to embed (one of them)" if not regions
                        else f"--masks / --boxes are MaskInversion's regions; {method} does not take them")
    if method == "ImageGroundingModule" and (options.classes is None) == (options.text is None):
        exit_with_error("--classes / --text: give one of them to the detector, not both")
    if options.writer_threads is not None and options.writer_threads < 0:
        exit_with_error(f"--writer_threads must be >= 0, got {options.writer_threads}")
    if options.every_class and (method != "ImageGroundingModule" or options.classes is None):
        exit_with_error("--every_class scores the detector's boxes for each class of --classes")
    if method not in ("ImageGroundingModule", *SYNTHESIS_MODULES) and options.text is not None:
        exit_with_error(f"--text is the detector's free prompt (and MIMIC's question); {method} takes --classes")
    if method in SYNTHESIS_MODULES and options.classes is None:
        exit_with_error(f"--classes: {method} synthesizes an image for each target text given: 'a red circle, a blue square'")
    if method not in ("ImageGroundingModule", "MaskInversionModule", *SYNTHESIS_MODULES) and options.classes is None:
        exit_with_error(f"--classes: {method} segments the classes given (--text is the detector's)")


def predict(args: list[str] | None = None) -> dict:
    """Run a method on the user's images (``Trainer.predict`` over an ``ImageFolderDataModule``); writes the
    outputs of ``grounding.lightning.prediction_writer`` and ``predictions.json`` (every record of the output
    folder's images, sorted by id), returns the printed summary."""
    args = list(sys.argv[1:] if args is None else args)
    options, command = predict_arguments(args)
    sections = config_sections(command[: command.index("--data")])
    config_data = sections.get("data", (None, {}, None))[1]
    if "model" in sections and "--help" not in args and "-h" not in args:  # before building anything
        predict_problem(sections["model"][0].rsplit(".", 1)[-1], options)
    with warnings.catch_warnings():  # sys.argv is left as given: DDP's other processes make the same command line
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        cli = build_cli(command)
    from grounding.data.image_folder import complete_record
    from grounding.lightning.label_writer import PredictionPngWriter
    from grounding.lightning.prediction_writer import ImagePredictionWriter, default_writer_threads

    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    method = type(model).__name__
    predict_problem(method, options)
    if method == "InvSegModule" and model.hparams.categories == "oracle":
        exit_with_error("--model.categories oracle needs ground truth; use all (the classes given) or filter")
    if method == "ImageGroundingModule":
        model.predict_settings = {
            "classes": data.class_names if options.text is None else None, "text": options.text,
            "box_threshold": options.box_threshold, "text_threshold": options.text_threshold, "top_k": options.top_k,
            "every_class": options.every_class,
            "image_size": options.image_size or config_data.get("image_size"),
            "max_size": options.max_size if options.max_size is not None else config_data.get("max_size", 1333),
        }
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, PredictionPngWriter)]
    threads = default_writer_threads(trainer.num_devices) if options.writer_threads is None else options.writer_threads
    trainer.callbacks.append(ImagePredictionWriter(threads, pictures=not options.no_pictures))
    fix_logger_versions(trainer)
    stdout = sys.stdout
    with _run():
        trainer.predict(model, datamodule=data, ckpt_path=cli.config.ckpt_path, return_predictions=False, weights_only=True)
        run_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
        out_dir = Path(options.out) if options.out else Path(run_dir or trainer.default_root_dir) / "predictions"
        finish_distributed()  # every process has written its records
        counts = {k.split("/", 1)[1]: int(v) for k, v in trainer.callback_metrics.items() if k.startswith("predict/")}
        summary = {"out": str(out_dir), "images": len(data.ids), "predicted": counts.get("predicted", 0),
                   "skipped_existing": counts.get("skipped_existing", 0), "unreadable": counts.get("unreadable", 0),
                   "run_dir": run_dir}
        if trainer.is_global_zero:
            records = {image_id: complete_record(out_dir, image_id) for image_id in data.ids}
            missing = [source for image_id, source in zip(data.ids, data.sources) if records[image_id] is None]
            if missing:
                log.warning("%d of %d images have no prediction (unreadable, or without regions): %s", len(missing),
                            len(data.ids), "; ".join(missing[:20]))
            everything = [records[image_id] for image_id in sorted(records) if records[image_id] is not None]
            from grounding.utils import write_json_atomic

            write_json_atomic(out_dir / "predictions.json", everything, indent=1)
            print_json(summary, stdout)
    return summary


def predict_main() -> None:
    """Console script ``grounding-predict``."""
    predict()


def train_main() -> None:
    """Console script ``grounding-train``."""
    train()


def eval_main() -> None:
    """Console script ``grounding-eval``."""
    evaluate()
