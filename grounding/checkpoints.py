"""Reading checkpoints without running the code a pickle may name.

A checkpoint is a pickle, and unpickling one in full calls whatever functions it names (an object whose
``__reduce__`` returns ``(os.system, ("...",))`` runs that command on load). Every checkpoint this package
reads goes through ``torch.load(..., weights_only=True)``, whose unpickler rebuilds only tensors, plain Python
values (numbers, strings, None, lists, tuples, dicts, sets, ``OrderedDict``) and the classes allowed
explicitly. ``SAFE_CLASS_PATHS`` is the one list of the classes this package allows: the settings dataclasses
its LightningModules keep in their hyper-parameters when they are built in Python (the command line stores
the same settings as plain dicts). Rebuilding one of them creates the object and sets its fields; it calls
no constructor and no other function.

What the checkpoints hold (torch 2.14, lightning 2.6; ``torch.serialization.get_unsafe_globals_in_checkpoint``
and the pickle's opcodes):

- written by ``grounding-train`` / ``grounding-eval`` / ``grounding-predict`` (any method, any precision,
  also a resumable ``last.ckpt``): tensors, ``OrderedDict`` and plain values only. The hyper-parameters
  are the config's values, the optimizer and LR-scheduler states, loops and callbacks' states are dicts of
  tensors and numbers, and ``LastCheckpoint`` stores the random states as tensors and tuples;
- a module built in Python (``ImageGroundingModule(masking=MaskingConfig(...))``, ``MimicModule()``): also
  its settings dataclasses, each in ``SAFE_CLASS_PATHS``.

Why an allow-list rather than plain hyper-parameters: ``load_from_checkpoint`` hands the saved values back to
the constructors, which take these dataclasses, and checkpoints already written hold them.

The readers: ``load_checkpoint`` (``grounding.models.detector.read_checkpoint``, the weight ensembles,
``grounding.cli``'s checks before a run), ``safe_loading`` around Lightning's own load
(``grounding.lightning.callbacks.AtomicCheckpointIO``, with ``weights_only=True`` from ``Trainer.fit`` /
``test`` / ``predict``). A checkpoint that needs anything else is an ``UnsafeCheckpointError`` naming the
file and the globals it would need, found by reading the pickle's opcodes (``pickle_globals``) without
executing any of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

#: the classes a checkpoint may hold besides tensors and plain values: the settings dataclasses the
#: LightningModules store with ``save_hyperparameters`` (IMAGE, InvSeg, MaskInversion, MIMIC; GEM has none)
SAFE_CLASS_PATHS = (
    "grounding.models.adaptive_masking.MaskingConfig",
    "grounding.models.denoising.DenoisingConfig",
    "grounding.models.lora.LoraSettings",
    "grounding.models.invseg_inversion.InversionSettings",
    "grounding.models.invseg_inversion.BaselineSettings",
    "grounding.data.category_lists.CategoryFile",
    "grounding.models.maskinversion.MaskInversionSettings",
    "grounding.models.mimic.vlm.VLMSettings",
    "grounding.models.mimic.priors.PriorSettings",
    "grounding.models.mimic.objective.SynthesisSettings",
    "grounding.models.mimic.objective.MimicWeights",
    "grounding.lightning.mimic_module.ScoringSettings",
    "grounding.lightning.mimic_module.LoggingSettings",
)

#: pickle opcodes that push a string (the operands of ``STACK_GLOBAL``)
_STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
#: opcodes that change neither the stack's top nor the memo as far as the scan is concerned
_NEUTRAL_OPCODES = {"PROTO", "FRAME", "MEMOIZE", *_MEMO_PUTS}


class UnsafeCheckpointError(ValueError):
    """A checkpoint that ``torch.load(weights_only=True)`` with ``SAFE_CLASS_PATHS`` refuses; ``names`` are the
    globals it would need (empty when the refusal is for another reason, then in ``detail``)."""

    def __init__(self, path: str | Path, names: Iterable[str], detail: str = ""):
        self.path, self.names, self.detail = str(path), list(names), detail
        what = (f"pickled objects ({', '.join(self.names)})" if self.names
                else f"pickled data that the safe loader refuses ({detail or 'no reason given'})")
        super().__init__(
            f"{self.path} holds {what}; refusing to unpickle arbitrary objects, which can run any code (only "
            "tensors, plain values and the settings classes of grounding.checkpoints.SAFE_CLASS_PATHS are read)"
        )


# ------------------------------------------------------------------------------------------- the allow-list
def allowed_classes(names: Iterable[str] | None = None) -> list[type]:
    """The classes of ``SAFE_CLASS_PATHS`` (only those among ``names`` when given), imported. Each must be a
    dataclass: the list never holds a function or another callable that unpickling would call."""
    named = None if names is None else set(names)
    wanted = [path for path in SAFE_CLASS_PATHS if named is None or path in named]
    classes = []
    for path in wanted:
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"SAFE_CLASS_PATHS names {path}, which is not a dataclass")
        classes.append(cls)
    return classes


@contextlib.contextmanager
def safe_globals(names: Iterable[str] | None = None) -> Iterator[None]:
    """``torch.serialization.safe_globals`` of ``allowed_classes(names)``: inside it, ``torch.load(...,
    weights_only=True)`` also rebuilds these classes. Classes the caller had already allowed stay allowed on exit."""
    registered = torch.serialization.get_safe_globals()
    added = [cls for cls in allowed_classes(names) if cls not in registered]
    with torch.serialization.safe_globals(added):
        yield


# --------------------------------------------------------------------------------- the globals of a pickle
def pickle_globals(data: io.BufferedIOBase) -> list[str]:
    """Every global (``module.name``) the pickles in ``data`` name, in order, read from their opcodes with
    ``pickletools`` (any protocol; nothing is executed). Concatenated pickles (torch's legacy format) are read
    one after the other until the data is not a pickle anymore."""
    found: list[str] = []
    for _ in range(8):  # the legacy format holds 5 pickles, then raw tensor bytes
        strings: list[str | None] = []  # what the recent opcodes pushed: a string or None
        memo: dict[int, str | None] = {}
        try:
            for opcode, arg, _position in pickletools.genops(data):
                name = opcode.name
                if name in ("GLOBAL", "INST"):  # INST: a class named and called (protocols 0 and 1)
                    found.append(str(arg).replace(" ", ".", 1))
                elif name == "STACK_GLOBAL":
                    module, qualname = (strings[-2:] if len(strings) >= 2 else [None, None])
                    found.append(f"{module or '?'}.{qualname or '?'}")
                if name in _STRING_OPCODES:
                    strings.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
                elif name in _MEMO_GETS:
                    strings.append(memo.get(arg))
                elif name in _MEMO_PUTS:
                    memo[arg] = strings[-1] if strings else None
                elif name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif name not in _NEUTRAL_OPCODES:
                    strings.append(None)
        except Exception:  # noqa: BLE001 - past the last pickle (raw bytes or the end of the data)
            break
    return list(dict.fromkeys(found))


def checkpoint_globals(path: str | Path) -> list[str] | None:
    """Every global the checkpoint file's pickle names (``pickle_globals``; of ``data.pkl`` for torch's zip
    format), or None where the file cannot be read as either format."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                records = sorted((n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), key=len)
                if not records:
                    return None
                return pickle_globals(io.BytesIO(archive.read(records[0])))
        with open(path, "rb") as file:
            return pickle_globals(file)
    except (OSError, zipfile.BadZipFile, ValueError):
        return None


def _torch_default_globals() -> set[str]:
    """The globals ``weights_only`` loading allows by itself (tensor rebuilding, ``OrderedDict``, ...); only to
    leave them out of messages. The table is private to torch: without it, every global is named."""
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals())
    except Exception:  # noqa: BLE001 - a torch without the table
        return set()


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals the checkpoint names beyond torch's own and ``SAFE_CLASS_PATHS`` (empty when it names none
    or cannot be read)."""
    allowed = _torch_default_globals() | set(SAFE_CLASS_PATHS)
    return [name for name in checkpoint_globals(path) or [] if name not in allowed]


def _refusal_detail(error: BaseException) -> str:
    """The line of torch's weights-only error that says what it refused (e.g. ``Unsupported operand 149``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        reason = line.split("WeightsUnpickler error:", 1)[-1].strip()
        if reason and not line.startswith(("Weights only load failed", "Check the documentation")):
            return reason
    return lines[0] if lines else type(error).__name__


# ---------------------------------------------------------------------------------------------- loading
@contextlib.contextmanager
def safe_loading(path: str | Path | None = None) -> Iterator[None]:
    """The context of a ``torch.load(path, weights_only=True)``: the allowed classes the file names are allowed
    (all of them where the file is not a local one), and a refusal is an ``UnsafeCheckpointError`` naming the
    file and the globals it would need."""
    local = path is not None and Path(path).is_file()
    names = checkpoint_globals(path) if local else None
    try:
        with safe_globals(names):
            yield
    except pickle.UnpicklingError as error:
        if path is None:
            raise
        raise UnsafeCheckpointError(path, unsafe_globals(path) if local else [], _refusal_detail(error)) from error


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with ``SAFE_CLASS_PATHS`` allowed; an ``UnsafeCheckpointError``
    for a file that needs anything else (nothing of it is executed). mmap: map the tensors instead of
    reading them (torch's zip format only)."""
    with safe_loading(path):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def peek_checkpoint(path: str | Path) -> Any:
    """The checkpoint with its tensors memory-mapped, not read (``load_checkpoint``; read in full for the legacy
    format, which cannot be mapped); an ``UnsafeCheckpointError`` as there, None where it cannot be read."""
    for mmap in (True, None):
        try:
            return load_checkpoint(path, mmap=mmap)
        except UnsafeCheckpointError:
            raise
        except Exception:  # noqa: BLE001 - unreadable here: its reader reports it
            continue
    return None


def saved_class_path(path: str | Path) -> str | None:
    """The LightningModule class the checkpoint was saved from (LightningCLI keeps it in the hyper-parameters as
    ``_class_path``), or None where it does not say or cannot be read; an ``UnsafeCheckpointError`` for a file
    the safe loader refuses."""
    checkpoint = peek_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    class_path = hparams.get("_class_path") if isinstance(hparams, dict) else None
    return class_path if isinstance(class_path, str) else None
