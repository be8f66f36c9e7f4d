"""Load EDM networks safely: the official ``.pkl`` files and our own ``.pt`` files.

Why the official pickles need care. NVIDIA's EDM network pickles (``edm-cifar10-32x32-cond-vp.pkl``
and friends) store every network object as a call ``torch_utils.persistence._reconstruct_persistent_obj
(meta)`` whose ``meta['module_src']`` is Python source that the official loader *executes*; a plain
``pickle.load`` can moreover call any importable function (``os.system``...). So a pickle is
executable content, and these files are large downloads from third parties.

How this module reads them without running anything from the file:

* :class:`_EDMUnpickler` resolves globals through a short explicit allowlist (``_SAFE_GLOBALS``);
  every other global (``os.system``, ``builtins.eval``, an unknown module) raises
  :class:`UnsafeCheckpointError` naming it, before anything is called. Nothing is imported on
  the file's behalf.
* The persistent-object hook is replaced by :func:`_reconstruct_persistent_obj`, which returns an
  inert :class:`PersistentRecord` (class name + state, i.e. plain data) and drops ``module_src``
  unread; ``ModuleDict`` becomes the inert :class:`ModuleDictRecord`.
* Tensor storages, which torch pickles as a nested legacy ``torch.save`` stream, are decoded with
  ``torch.load(..., weights_only=True)`` (torch's own restricted unpickler).
* The network is then built from *our* code (:data:`semmix_lib.edm.PRECONDITIONERS`) with the
  recorded constructor arguments, and the weights collected from the records are loaded strictly.

Our own format (``.pt``, :func:`save_edm`) is a dict of tensors, numbers and strings read with
``weights_only=True`` through :func:`semmix_lib.io.load_checkpoint`.
"""

from __future__ import annotations

import codecs
import collections
import copyreg
import io
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import edm
from .io import CheckpointError, load_checkpoint, save_checkpoint

__all__ = [
    "UnsafeCheckpointError", "EDMCheckpointError", "PersistentRecord", "ModuleDictRecord",
    "safe_load_pickle", "load_edm_checkpoint", "edm_state", "save_edm", "describe_checkpoint", "FORMAT",
]

FORMAT = "semmix-edm"  #: value of the ``format`` field of our ``.pt`` files

#: Model type an official preconditioner builds when its recorded kwargs do not name one.
_OFFICIAL_DEFAULT_MODEL_TYPE = {"VPPrecond": "SongUNet", "VEPrecond": "SongUNet",
                                "EDMPrecond": "DhariwalUNet", "iDDPMPrecond": "DhariwalUNet"}

_DOWNLOAD_HINT = (
    "Download the official network pickle and save it at exactly that path: for CIFAR-10 "
    "edm-cifar10-32x32-cond-vp.pkl from the NVlabs EDM release "
    "(https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl); for CIFAR-100 "
    "the class-conditional VP EDM pickle released by the DM-Improves-AT project "
    "(https://github.com/wzekai99/DM-Improves-AT). Or train one with semmix_lib.edm_train (edm.pt).")


class UnsafeCheckpointError(pickle.UnpicklingError, CheckpointError):
    """The file asks for something this loader refuses to do (a global outside the allowlist,
    a malformed record, a tensor storage torch's weights-only loader rejects)."""


class EDMCheckpointError(CheckpointError):
    """A checkpoint that is truncated/corrupt, holds an unsupported network, or whose weights do
    not match the network it describes."""


# --------------------------------------------------------------------------------------------------
# Inert stand-ins and allowlisted constructors. Each only stores or converts data.

class PersistentRecord:
    """What an official persistent object (network, loss, augment pipe) becomes: its class name and
    pickled ``__dict__`` as data. No class is looked up and ``module_src`` is never kept."""

    def __init__(self, class_name: str, version, state: dict):
        self.class_name, self.version, self.state = class_name, version, state

    @property
    def init_args(self) -> tuple:
        return tuple(self.state.get("_init_args") or ())

    @property
    def init_kwargs(self) -> dict:
        return dict(self.state.get("_init_kwargs") or {})

    def __setstate__(self, state):  # official records carry no BUILD state; refuse crafted ones
        raise UnsafeCheckpointError(f"unexpected state assignment on persistent record {self.class_name!r}")

    def __repr__(self):
        return f"PersistentRecord({self.class_name!r})"


class ModuleDictRecord:
    """Stand-in for ``torch.nn.ModuleDict`` (pickled as class + BUILD state): keeps the state dict."""

    state: dict = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise UnsafeCheckpointError("ModuleDict state is not a dict")
        self.state = state


class _EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a plain dict (it has a ``__dict__`` for BUILD)."""


def _reconstruct_persistent_obj(meta):
    if not (isinstance(meta, dict) and meta.get("type") == "class" and isinstance(meta.get("class_name"), str)
            and isinstance(meta.get("state"), dict)):
        raise UnsafeCheckpointError("malformed persistent-object record")
    return PersistentRecord(meta["class_name"], meta.get("version"), dict(meta["state"]))


def _load_storage(data):
    """``torch.storage._load_from_bytes`` without full pickle: torch's weights-only loader."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafeCheckpointError("tensor storage is not bytes")
    try:
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = (str(err).splitlines() or [""])[0][:200]
        raise UnsafeCheckpointError(f"a tensor storage was refused by torch's weights-only loader: {first}") from err
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UnsafeCheckpointError(f"tensor storage decodes to {type(storage).__name__}, not a storage")
    return storage


def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)) or hooks:
        raise UnsafeCheckpointError("tensor record without a storage, or with backward hooks")
    extra = (metadata,) if isinstance(metadata, dict) else ()
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, bool(requires_grad),
                                           collections.OrderedDict(), *extra)


def _rebuild_parameter(data, requires_grad, hooks, state=None):  # attribute ``state`` is dropped
    if not isinstance(data, torch.Tensor) or hooks:
        raise UnsafeCheckpointError("parameter record without a tensor, or with backward hooks")
    return nn.Parameter(data, bool(requires_grad))


def _np_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        raise UnsafeCheckpointError("numpy dtype spec is not a string")
    dtype = np.dtype(spec, align, copy)
    if dtype.hasobject:
        raise UnsafeCheckpointError(f"numpy object dtype {spec!r} refused")
    return dtype


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise UnsafeCheckpointError("numpy scalar needs a non-object dtype and raw bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0].copy()


def _latin1_encode(text, encoding="utf-8"):  # how protocol-2 pickles spell bytes
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError("_codecs.encode is only allowed for latin1 byte strings")
    return codecs.encode(text, "latin1")


def _reconstructor(cls, base, state):  # protocol 0/1 object creation, for our stand-ins only
    if cls not in (ModuleDictRecord, _EasyDict) or base not in (object, dict):
        raise UnsafeCheckpointError("copyreg._reconstructor is only allowed for ModuleDict/EasyDict")
    return copyreg._reconstructor(cls, base, state)


_SAFE_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.nn.modules.container", "ModuleDict"): ModuleDictRecord,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "dtype"): _np_dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "dict"): dict,
    ("builtins", "object"): object,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _latin1_encode,
}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # names protocol < 3 writes


class _EDMUnpickler(pickle.Unpickler):
    """Unpickler whose only callables are the allowlisted, data-only ones in ``_SAFE_GLOBALS``.
    Persistent ids are refused too (no ``persistent_load``)."""

    def find_class(self, module, name):
        target = _SAFE_GLOBALS.get((_PY2_MODULES.get(module, module), name))
        if target is None:
            raise UnsafeCheckpointError(
                f"refusing to load global '{module}.{name}': an EDM network pickle only needs tensors, "
                "containers and persistent-object records, and anything else could run code")
        return target


def safe_load_pickle(path) -> object:
    """Unpickle an official EDM file into plain data and inert records (never executes its code)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no EDM checkpoint at {path}. {_DOWNLOAD_HINT}")
    try:
        with open(path, "rb") as f:
            return _EDMUnpickler(f).load()
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{path}: {err}") from None
    except Exception as err:  # EOFError, 'pickle data was truncated', bad opcodes, bad tensor bytes
        first = (str(err).splitlines() or [""])[0][:200]
        raise EDMCheckpointError(f"cannot read {path}: the file is truncated or corrupt ({type(err).__name__}: "
                                 f"{first}); delete it and download it again. {_DOWNLOAD_HINT}") from err


# --------------------------------------------------------------------------------------------------
# From records to our network.

def _collect_tensors(obj, prefix: str, params: dict, buffers: dict) -> None:
    """Walk a record tree like ``nn.Module.state_dict``: parameters and persistent, non-None buffers."""
    def field(name):
        value = obj.state.get(name) or {}
        if not isinstance(value, (dict, set)):
            raise EDMCheckpointError(f"{prefix or 'top level'}: {name} is a {type(value).__name__}")
        return value

    for name, p in field("_parameters").items():
        if p is not None:
            params[prefix + name] = p
    skip = field("_non_persistent_buffers_set")
    for name, b in field("_buffers").items():
        if b is not None and name not in skip:
            buffers[prefix + name] = b
    for name, child in field("_modules").items():
        if child is None:
            continue
        if not isinstance(child, (PersistentRecord, ModuleDictRecord)):
            raise EDMCheckpointError(f"sub-module {prefix + name!r} is a {type(child).__name__}, not a network record")
        _collect_tensors(child, f"{prefix}{name}.", params, buffers)
    for key, value in {**params, **buffers}.items():
        if not isinstance(value, torch.Tensor):
            raise EDMCheckpointError(f"{key!r} is a {type(value).__name__}, not a tensor")


def _check_record(record, where: str) -> tuple[type, tuple, dict]:
    """Our class and constructor arguments for an official network record, or a clear error."""
    supported = (f"this loader supports {sorted(edm.PRECONDITIONERS)} with model_type in "
                 f"{sorted(edm.MODEL_TYPES)} (e.g. the official *-cond-vp.pkl CIFAR networks)")
    if not isinstance(record, PersistentRecord):
        raise EDMCheckpointError(f"{where} is a {type(record).__name__}, not an EDM network; {supported}")
    if record.class_name not in edm.PRECONDITIONERS:
        raise EDMCheckpointError(f"{where} is a {record.class_name!r} network; {supported}")
    kwargs = record.init_kwargs
    model_type = kwargs.setdefault("model_type", _OFFICIAL_DEFAULT_MODEL_TYPE.get(record.class_name))
    model = (record.state.get("_modules") or {}).get("model")
    model_class = model.class_name if isinstance(model, PersistentRecord) else model_type
    if model_type not in edm.MODEL_TYPES or model_class != model_type:
        raise EDMCheckpointError(f"{where} is a {record.class_name} around a {model_class!r} model; {supported}")
    return edm.PRECONDITIONERS[record.class_name], record.init_args, kwargs


def _build(cls: type, args: tuple, kwargs: dict, where: str) -> nn.Module:
    try:
        with torch.random.fork_rng(devices=[]):  # random init is overwritten; keep the caller's RNG intact
            return cls(*args, **kwargs)
    except (TypeError, ValueError) as err:
        raise EDMCheckpointError(f"{where}: cannot build {cls.__name__} from the recorded arguments "
                                 f"{sorted(kwargs)}: {err}") from err


def _load_strict(net: nn.Module, state_dict: dict, where: str) -> None:
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise EDMCheckpointError(f"{where}: weights do not match the {type(net).__name__} they describe; "
                                 f"missing keys {missing}, unexpected keys {unexpected}")
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise EDMCheckpointError(f"{where}: weights do not fit the network: {err}") from err


def _ours(data, key: str, where: str) -> dict:
    sub = data.get(key) if isinstance(data, dict) else None
    ckpt = sub if isinstance(sub, dict) and sub.get("format") == FORMAT else data
    if not (isinstance(ckpt, dict) and ckpt.get("format") == FORMAT):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise EDMCheckpointError(f"{where} is not a semmix EDM checkpoint (expected format {FORMAT!r}; found {found})")
    if ckpt.get("class_name") not in edm.PRECONDITIONERS:
        raise EDMCheckpointError(f"{where}: unsupported network class {ckpt.get('class_name')!r}; "
                                 f"supported: {sorted(edm.PRECONDITIONERS)}")
    return ckpt


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        return "pkl"
    if suffix in (".pt", ".pth"):
        return "pt"
    raise ValueError(f"{path}: unknown EDM checkpoint type {suffix!r}; use an official .pkl or our .pt")


def load_edm_checkpoint(path, key: str = "ema", device="cpu") -> nn.Module:
    """Load an EDM network (eval mode, no gradients, on ``device``).

    ``.pkl``: an official NVIDIA EDM pickle, read with the restricted unpickler; ``key`` picks the
    entry (``ema`` holds the released network). ``.pt``/``.pth``: our :func:`save_edm` format; if
    ``key`` names a sub-checkpoint (e.g. ``ema`` next to the main net) that one is loaded.
    """
    path = Path(path)
    kind = _kind(path)
    if kind == "pkl":
        data = safe_load_pickle(path)
        if not isinstance(data, dict) or key not in data:
            found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise EDMCheckpointError(f"{path}: no entry {key!r} (found {found})")
        cls, args, kwargs = _check_record(data[key], f"{path}[{key!r}]")
        params, buffers = {}, {}
        _collect_tensors(data[key], "", params, buffers)
        net, state_dict = _build(cls, args, kwargs, str(path)), {**params, **buffers}
    else:
        if not path.exists():
            raise FileNotFoundError(f"no EDM checkpoint at {path}. {_DOWNLOAD_HINT}")
        ckpt = _ours(load_checkpoint(path), key, str(path))
        net = _build(edm.PRECONDITIONERS[ckpt["class_name"]], (), dict(ckpt["init_kwargs"]), str(path))
        state_dict = ckpt["state_dict"]
    _load_strict(net, state_dict, str(path))
    return net.eval().requires_grad_(False).to(device)


# --------------------------------------------------------------------------------------------------
# Our format.

def _plain(x):
    """numpy scalars -> Python numbers, recursively, so ``weights_only`` loading accepts the kwargs."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    return x


def edm_state(net: nn.Module) -> dict:
    """The ``.pt`` record of a preconditioned network: class name, constructor kwargs, weights."""
    name = type(net).__name__
    if edm.PRECONDITIONERS.get(name) is not type(net):
        raise TypeError(f"save_edm expects one of {sorted(edm.PRECONDITIONERS)}, got {name}")
    return {"format": FORMAT, "class_name": name, "init_kwargs": _plain(dict(net.init_kwargs)),
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "num_parameters": sum(p.numel() for p in net.parameters())}


def save_edm(path, net: nn.Module, **extra) -> None:
    """Write ``net`` atomically in our ``.pt`` format; ``extra`` entries (e.g. ``ema=edm_state(ema)``,
    a step count) are stored alongside and must themselves be ``weights_only``-loadable."""
    state = edm_state(net)
    clash = sorted(set(extra) & set(state))
    if clash:
        raise ValueError(f"extra entries {clash} would overwrite the checkpoint's own fields")
    save_checkpoint(path, {**state, **extra})


def _summary(value):
    if isinstance(value, PersistentRecord):
        return f"<{value.class_name}>"
    if isinstance(value, dict) and value.get("format") == FORMAT:
        return f"<{value.get('class_name')} checkpoint>"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict) and all(isinstance(v, (bool, int, float, str, type(None))) for v in value.values()):
        return _plain(dict(value))
    return f"<{type(value).__name__}>"


def describe_checkpoint(path, key: str = "ema") -> dict:
    """What a checkpoint holds, for printing (read as safely as :func:`load_edm_checkpoint`, no
    network is built): class name, model type, constructor kwargs, parameter count, other entries."""
    path = Path(path)
    if _kind(path) == "pkl":
        data = safe_load_pickle(path)
        if not isinstance(data, dict) or key not in data:
            raise EDMCheckpointError(f"{path}: no entry {key!r}")
        if not isinstance(data[key], PersistentRecord):
            raise EDMCheckpointError(f"{path}[{key!r}] is a {type(data[key]).__name__}, not a network record")
        try:
            supported = bool(_check_record(data[key], f"{path}[{key!r}]"))
        except EDMCheckpointError:
            supported = False
        params, buffers = {}, {}
        _collect_tensors(data[key], "", params, buffers)
        kwargs, name = data[key].init_kwargs, data[key].class_name
        num = sum(p.numel() for p in params.values())
        others = {k: _summary(v) for k, v in data.items() if k != key}
        fmt = "official EDM pickle"
    else:
        if not path.exists():
            raise FileNotFoundError(f"no EDM checkpoint at {path}. {_DOWNLOAD_HINT}")
        data = load_checkpoint(path)
        ckpt = _ours(data, key, str(path))
        kwargs, name, num = ckpt["init_kwargs"], ckpt["class_name"], ckpt.get("num_parameters")
        own = {"format", "class_name", "init_kwargs", "state_dict", "num_parameters"}
        others = {k: _summary(v) for k, v in data.items() if k not in own and data.get(k) is not ckpt}
        fmt, supported = FORMAT, True
    return {"path": str(path), "format": fmt, "key": key, "class_name": name, "supported": supported,
            "model_type": kwargs.get("model_type", _OFFICIAL_DEFAULT_MODEL_TYPE.get(name)),
            "init_kwargs": _plain(dict(kwargs)), "num_parameters": num, "other_entries": others}
