"""Self-describing model files: weights plus everything needed to rebuild and sample the model.

A model file (``torch.save`` of plain data, read with ``weights_only=True``) holds::

    {"format": "energyflow-model/1",
     "class": "energyflow.MLPField",        # a *registered* network class
     "init": {"dim": 2, "hidden": 64, ...},  # its constructor arguments
     "path": {"name": "ot", ...},            # build_path(**path) (optional)
     "prediction": "velocity",               # what the network outputs (optional)
     "sample_shape": [2],                    # the shape of one sample (optional)
     "state_dict": {...}, "meta": {...}}

:func:`load_model` rebuilds the network with no domain code, in the spirit of diffusers'
``save_pretrained`` / ``from_pretrained``.  The class named in a file is looked up only among
registered classes — the core's networks, classes decorated with :func:`register_model` that are
already imported, and classes that installed packages declare in the ``energyflow.models``
entry-point group — so a model file can never make energyflow import or call arbitrary code.
"""
from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

from torch import nn

from .errors import CorruptFileError, InputError, UnsafeFileError

__all__ = ["MODEL_FORMAT", "register_model", "registered_models", "model_record", "save_model_file", "load_model",
           "SavedModel"]

MODEL_FORMAT = "energyflow-model/1"
ENTRY_POINT_GROUP = "energyflow.models"
_REGISTRY: dict[str, type] = {}
M = TypeVar("M", bound=type)


def register_model(name: Optional[str] = None) -> Callable[[M], M]:
    """Class decorator: make a network class loadable from model files under ``name`` (default
    ``"<module>.<ClassName>"``) and record its constructor arguments in ``self.init_kwargs``.

    Constructor arguments must be plain data (numbers, strings, lists, dicts, tensors) so that a
    model file stays loadable with ``weights_only=True``.
    """

    def decorate(cls: M) -> M:
        key = name or f"{cls.__module__}.{cls.__qualname__}"
        original = cls.__init__
        signature = inspect.signature(original)

        @functools.wraps(original)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            if type(self) is cls:  # a subclass records its own arguments
                bound = signature.bind(self, *args, **kwargs)
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                arguments.pop(next(iter(signature.parameters)))  # self
                self.init_kwargs = arguments
                self.registered_name = key

        cls.__init__ = __init__  # type: ignore[method-assign]
        _REGISTRY[key] = cls
        return cls

    return decorate


def registered_models() -> list[str]:
    """Names of the classes a model file may name (imported ones and installed entry points)."""
    from importlib.metadata import entry_points

    _import_core_models()
    return sorted(set(_REGISTRY) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def _import_core_models() -> None:
    from . import image_nets, nets  # noqa: F401  (registers the core networks; image_nets imports diffusers lazily)


def _resolve(name: str, source: str) -> type:
    _import_core_models()
    if name in _REGISTRY:
        return _REGISTRY[name]
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            cls = ep.load()
            _REGISTRY.setdefault(name, cls)
            return cls
    raise UnsafeFileError(f"model file {source} names the class {name!r}, which is not a registered energyflow model "
                          f"(registered: {registered_models()}); refusing to import it")


def model_record(net: nn.Module, path: Any = None, prediction: Optional[str] = None,
                 sample_shape: Optional[tuple[int, ...]] = None, meta: Optional[dict[str, Any]] = None) -> dict:
    """The self-describing record of ``net`` (see the module docstring); ``path`` is a
    :class:`~energyflow.paths.Path`, its name (``"ot"``, ``"vp"``) or its spec dict."""
    name = getattr(net, "registered_name", None)
    if name is None or not hasattr(net, "init_kwargs"):
        raise TypeError(f"{type(net).__name__} is not a registered model: decorate its class with "
                        f"@energyflow.models.register_model() to save it self-describingly")
    if isinstance(path, str):
        from .paths import build_path

        path = build_path(path)
    spec = path.spec() if hasattr(path, "spec") else (dict(path) if path is not None else None)
    if prediction is None and path is not None and hasattr(path, "default_prediction"):
        prediction = path.default_prediction
    if sample_shape is None and getattr(net, "sample_shape", None) is not None:
        sample_shape = tuple(int(s) for s in net.sample_shape)  # e.g. an image net's (C, H, W)
    elif sample_shape is None and isinstance(getattr(net, "dim", None), int):
        sample_shape = (net.dim,)
    return {"format": MODEL_FORMAT, "class": name, "init": dict(net.init_kwargs), "path": spec,
            "prediction": prediction, "sample_shape": list(sample_shape) if sample_shape is not None else None,
            "state_dict": net.state_dict(), "meta": dict(meta or {})}


def save_model_file(file: str | os.PathLike, net: nn.Module, path: Any = None, prediction: Optional[str] = None,
                    sample_shape: Optional[tuple[int, ...]] = None, meta: Optional[dict[str, Any]] = None) -> str:
    """Write ``net`` as a self-describing model file, atomically; returns the file's path."""
    from .files import atomic_torch_save

    atomic_torch_save(model_record(net, path, prediction, sample_shape, meta), file)
    return os.fspath(file)


@dataclass
class SavedModel:
    """A network rebuilt from a model file, with what it was saved with."""

    net: nn.Module
    path: Any = None
    prediction: Optional[str] = None
    sample_shape: Optional[tuple[int, ...]] = None
    meta: dict[str, Any] = field(default_factory=dict)
    file: str = ""

    def predictor(self, **kwargs: Any):
        """A :class:`~energyflow.predictor.Predictor` of the network on its path."""
        from .predictor import Predictor

        if self.path is None:
            raise InputError(f"model file {self.file} stores no path: it is not a sampling model")
        return Predictor(self.net, self.path, prediction=self.prediction, **kwargs)


def load_model(file: str | os.PathLike, map_location: Any = "cpu") -> SavedModel:
    """Rebuild a model saved by :func:`save_model_file` (or ``energyflow.experiment.save_model``).

    Raises:
        InputError / CorruptFileError: a missing, truncated or malformed file, or weights that do
            not fit the stored constructor arguments (one line naming the file).
        UnsafeFileError: the file needs a full unpickler, or names a class that is not registered.
    """
    from .files import load_torch
    from .paths import build_path

    source = os.fspath(file)
    record = load_torch(source, what="model file", map_location=map_location)
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT:
        have = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise CorruptFileError(f"{source} is not a self-describing energyflow model file (format {have!r}; "
                               f"expected {MODEL_FORMAT!r})")
    for key in ("class", "init", "state_dict"):
        if key not in record:
            raise CorruptFileError(f"model file {source} lacks its {key!r} entry")
    cls = _resolve(str(record["class"]), source)
    try:
        net = cls(**record["init"])
        net.load_state_dict(record["state_dict"])
    except (TypeError, RuntimeError, ValueError) as err:
        reason = " ".join(str(err).split())[:300]
        raise CorruptFileError(f"model file {source}: cannot rebuild {record['class']} from its stored arguments "
                               f"and weights ({reason})") from None
    spec = record.get("path")
    try:
        path = build_path(**spec) if spec else None
    except (TypeError, ValueError) as err:
        raise CorruptFileError(f"model file {source} stores an invalid path {spec!r} ({err})") from None
    shape = record.get("sample_shape")
    return SavedModel(net=net.eval(), path=path, prediction=record.get("prediction"),
                      sample_shape=tuple(shape) if shape is not None else None, meta=dict(record.get("meta") or {}),
                      file=source)
