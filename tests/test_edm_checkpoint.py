"""Tests for semmix_lib.edm_checkpoint: official EDM pickles read without running their code,
strict weight loading, clear errors, and our own ``.pt`` format.

The official files cannot be downloaded here, so :func:`write_official_pickle` produces the same
byte-level structure: while it runs, fake ``torch_utils.persistence`` modules exist, and every EDM
module is reduced to ``_reconstruct_persistent_obj(meta)`` with ``meta = {type, version,
module_src, class_name, state}``, as NVIDIA's ``persistent_class`` does; ``ModuleDict``, tensors and
numpy scalars pickle normally. The fake modules are gone before anything is loaded.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from semmix_lib import edm
from semmix_lib.edm_checkpoint import (
    EDMCheckpointError,
    UnsafeCheckpointError,
    describe_checkpoint,
    edm_state,
    load_edm_checkpoint,
    safe_load_pickle,
)
from semmix_lib.edm_checkpoint import save_edm
from semmix_lib.io import CheckpointError, save_checkpoint

VP_SMALL = dict(precond="VPPrecond", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                augment_dim=9, dropout=0.13)
# Exercises the other code paths: Fourier embedding (a buffer), residual encoder, skip decoder.
EDM_SMALL = dict(precond="EDMPrecond", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                 embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", decoder_type="skip",
                 resample_filter=[1, 3, 3, 1], dropout=0.0)
SOURCE = "class VPPrecond:\n    pass\n"  # stands in for networks.py; must never be executed


# --------------------------------------------------------------------------------------------------
# Writing files in the official format.

def _reconstruct_persistent_obj(meta):  # pickled by reference as torch_utils.persistence.<this>
    raise AssertionError("the official reconstruct hook must never be called by our loader")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


class Record:
    """A non-module persistent object (loss_fn, augment_pipe, or a hand-made network record)."""

    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state


class Payload:
    """Unpickling this calls ``func(*args)``: the classic pickle code-execution trick."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _meta(class_name, state, module_src):
    return dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)


class OfficialPickler(pickle.Pickler):
    """Pickles our EDM modules the way ``torch_utils.persistence`` does."""

    def __init__(self, f, protocol, module_src, top_kwargs=None):
        super().__init__(f, protocol=protocol)
        self.module_src, self.top_kwargs = module_src, top_kwargs

    def reducer_override(self, obj):
        if isinstance(obj, nn.Module) and type(obj).__module__ == edm.__name__:
            state = dict(obj.__dict__)
            if isinstance(obj, tuple(edm.PRECONDITIONERS.values())):
                kwargs = dict(self.top_kwargs if self.top_kwargs is not None else obj.init_kwargs)
            else:  # plausible sub-module kwargs (ignored by the loader), incl. numpy floats
                kwargs = {k: v for k, v in state.items()
                          if not k.startswith("_") and isinstance(v, (bool, int, float, str, np.floating))}
            state.update(_init_args=(), _init_kwargs=kwargs)
            return _reconstruct_persistent_obj, (_meta(type(obj).__name__, state, self.module_src),)
        if isinstance(obj, Record):
            return _reconstruct_persistent_obj, (_meta(obj.class_name, obj.state, self.module_src),)
        return NotImplemented


@contextlib.contextmanager
def fake_persistence_modules():
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    sys.modules.update({"torch_utils": pkg, "torch_utils.persistence": mod})
    try:
        yield
    finally:
        del sys.modules["torch_utils"], sys.modules["torch_utils.persistence"]


def official_bytes(data, protocol=4, module_src=SOURCE, top_kwargs=None) -> bytes:
    buf = io.BytesIO()
    with fake_persistence_modules():
        OfficialPickler(buf, protocol, module_src, top_kwargs).dump(data)
    return buf.getvalue()


def write_official_pickle(path, net, protocol=4, module_src=SOURCE, top_kwargs=None, **extra):
    data = {"ema": net, "loss_fn": Record("VPLoss", {"beta_d": 19.9, "beta_min": 0.1, "epsilon_t": 1e-5}),
            "augment_pipe": None, "dataset_kwargs": {"resolution": 8}, **extra}
    path.write_bytes(official_bytes(data, protocol, module_src, top_kwargs))
    assert "torch_utils" not in sys.modules and "torch_utils.persistence" not in sys.modules
    return path


def small_net(config=VP_SMALL, seed=0):
    torch.manual_seed(seed)
    net = edm.build_edm(config, img_resolution=8, img_channels=3, label_dim=10)
    with torch.no_grad():  # non-trivial values everywhere (zero-initialised layers included)
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.eval()


def assert_same_network(a, b, labels_dim=10, res=8, batch=3, one_hot=True):
    assert type(a) is type(b) and a.init_kwargs == b.init_kwargs
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, res, res, generator=gen)
    sigma = torch.tensor([0.05, 1.3, 40.0])[:batch]
    soft = torch.zeros(batch, labels_dim)
    soft[:, 2], soft[:, 7] = 0.3, 0.7  # a semantic-mixing label, lam * e_2 + (1 - lam) * e_7
    with torch.no_grad():
        for labels in (soft, torch.eye(labels_dim)[:batch])[:2 if one_hot else 1]:
            out_a, out_b = a.eval()(x, sigma, labels), b(x, sigma, labels)
            assert out_a.shape == x.shape and torch.isfinite(out_a).all()
            assert (out_a - out_b).abs().max().item() == 0.0


# --------------------------------------------------------------------------------------------------
# Official pickles.

@pytest.mark.parametrize("config", [VP_SMALL, EDM_SMALL], ids=["VPPrecond", "EDMPrecond"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_official_pickle_round_trip(tmp_path, config, protocol):
    net = small_net(config)
    path = write_official_pickle(tmp_path / "net.pkl", net, protocol=protocol)
    raw = path.read_bytes()
    for name in (b"_reconstruct_persistent_obj", b"ModuleDict", b"_load_from_bytes", b"scalar"):
        assert name in raw  # really the official structure, numpy scalars included
    rng = torch.get_rng_state()
    loaded = load_edm_checkpoint(path)
    assert torch.equal(torch.get_rng_state(), rng)  # loading does not disturb the caller's RNG
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert "torch_utils" not in sys.modules
    assert_same_network(net, loaded)


def test_safe_load_pickle_gives_inert_records(tmp_path):
    path = write_official_pickle(tmp_path / "net.pkl", small_net())
    data = safe_load_pickle(path)
    assert sorted(data) == ["augment_pipe", "dataset_kwargs", "ema", "loss_fn"]
    assert data["dataset_kwargs"] == {"resolution": 8} and data["augment_pipe"] is None
    assert data["loss_fn"].class_name == "VPLoss" and data["loss_fn"].state["beta_d"] == 19.9
    ema = data["ema"]
    assert ema.class_name == "VPPrecond" and ema.version == 6 and ema.init_args == ()
    assert not hasattr(ema, "module_src") and "module_src" not in vars(ema)
    assert ema.state["_modules"]["model"].class_name == "SongUNet"
    block = ema.state["_modules"]["model"].state["_modules"]["enc"].state["_modules"]["4x4_down"]
    assert block.class_name == "UNetBlock" and block.init_kwargs["skip_scale"] == pytest.approx(np.sqrt(0.5))


def test_describe_official_pickle(tmp_path):
    net = small_net()
    info = describe_checkpoint(write_official_pickle(tmp_path / "net.pkl", net))
    assert info["class_name"] == "VPPrecond" and info["model_type"] == "SongUNet" and info["supported"]
    assert info["init_kwargs"] == net.init_kwargs and info["format"] == "official EDM pickle"
    assert info["num_parameters"] == sum(p.numel() for p in net.parameters())
    assert info["other_entries"] == {"loss_fn": "<VPLoss>", "augment_pipe": None,
                                     "dataset_kwargs": {"resolution": 8}}


def test_official_cifar_config_round_trip(tmp_path):
    torch.manual_seed(0)
    net = edm.build_edm("cifar-ddpmpp", 32, 3, 10).eval()
    assert sum(p.numel() for p in net.parameters()) == 55_735_299
    loaded = load_edm_checkpoint(write_official_pickle(tmp_path / "edm-cifar10-32x32-cond-vp.pkl", net))
    assert_same_network(net, loaded, res=32, batch=2, one_hot=False)


# --------------------------------------------------------------------------------------------------
# Nothing from the file runs.

def test_module_src_is_never_executed(tmp_path):
    marker, control = tmp_path / "marker", tmp_path / "control"
    src = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('pwned')\n"
    exec(src.replace(str(marker), str(control)), {})  # the payload does work when executed...
    assert control.exists()
    net = small_net()
    loaded = load_edm_checkpoint(write_official_pickle(tmp_path / "net.pkl", net, module_src=src))
    assert not marker.exists()  # ...but the loader never executes it
    assert_same_network(net, loaded)


@pytest.mark.parametrize("make, name", [
    (lambda m: Payload(os.system, f"touch {m}"), f"{os.system.__module__}.system"),
    (lambda m: Payload(exec, f"open({str(m)!r}, 'w').write('x')"), "builtins.exec"),
    (lambda m: Payload(eval, f"open({str(m)!r}, 'w').write('x')"), "builtins.eval"),
    (lambda m: Payload(subprocess.Popen, ["touch", str(m)]), "subprocess.Popen"),
], ids=["os.system", "exec", "eval", "Popen"])
def test_dangerous_globals_are_refused(tmp_path, make, name):
    marker = tmp_path / "marker"
    path = write_official_pickle(tmp_path / "net.pkl", small_net(), evil=make(marker))  # not even under key
    with pytest.raises(UnsafeCheckpointError, match=name.replace(".", r"\.")) as info:
        load_edm_checkpoint(path)
    assert isinstance(info.value, pickle.UnpicklingError) and isinstance(info.value, CheckpointError)
    with pytest.raises(UnsafeCheckpointError):
        describe_checkpoint(path)
    assert not marker.exists()


def test_unknown_module_is_refused(tmp_path):
    path = tmp_path / "x.pkl"
    path.write_bytes(b"\x80\x02cnot_a_module\nanything\nq\x00.")
    with pytest.raises(UnsafeCheckpointError, match=r"not_a_module\.anything"):
        load_edm_checkpoint(path)


def test_malicious_tensor_storage_is_refused(tmp_path):
    marker, inner = tmp_path / "marker", io.BytesIO()
    torch.save(Payload(os.makedirs, str(marker)), inner, _use_new_zipfile_serialization=False)
    evil_storage = Payload(torch.storage._load_from_bytes, inner.getvalue())
    path = write_official_pickle(tmp_path / "net.pkl", small_net(), evil=evil_storage)
    with pytest.raises(UnsafeCheckpointError, match="weights-only"):
        load_edm_checkpoint(path)
    assert not marker.exists()


def test_object_dtype_numpy_scalar_is_refused(tmp_path):
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"ema": np.array([None], dtype=object)[0:1].dtype}, protocol=4))
    with pytest.raises(UnsafeCheckpointError, match="object dtype"):
        safe_load_pickle(path)


# --------------------------------------------------------------------------------------------------
# Clear errors.

def _record(class_name, kwargs, model_class="SongUNet"):
    model = Record(model_class, {"_parameters": {}, "_buffers": {}, "_modules": {}})
    return Record(class_name, {"_init_args": (), "_init_kwargs": kwargs, "_parameters": {}, "_buffers": {},
                               "_modules": {"model": model}})


@pytest.mark.parametrize("record, message", [
    (_record("VEPrecond", dict(img_resolution=8, img_channels=3, model_type="SongUNet")), "'VEPrecond' network"),
    (_record("VPPrecond", dict(img_resolution=8, img_channels=3, model_type="DhariwalUNet"), "DhariwalUNet"),
     "'DhariwalUNet' model"),
    # the official EDMPrecond defaults to DhariwalUNet when model_type is not recorded
    (_record("EDMPrecond", dict(img_resolution=8, img_channels=3), "DhariwalUNet"), "'DhariwalUNet' model"),
    (_record("VPPrecond", dict(img_resolution=8, img_channels=3, model_type="SongUNet"), "DhariwalUNet"),
     "'DhariwalUNet' model"),
    ({"not": "a network"}, "dict, not an EDM network"),
], ids=["VEPrecond", "Dhariwal-kwarg", "EDM-default-Dhariwal", "Dhariwal-submodule", "plain-dict"])
def test_unsupported_networks(tmp_path, record, message):
    path = tmp_path / "x.pkl"
    path.write_bytes(official_bytes({"ema": record}))
    with pytest.raises(EDMCheckpointError, match=message) as info:
        load_edm_checkpoint(path)
    assert "['EDMPrecond', 'VPPrecond']" in str(info.value) and "['SongUNet']" in str(info.value)


def test_missing_key_and_bad_kwargs(tmp_path):
    path = write_official_pickle(tmp_path / "net.pkl", small_net())
    with pytest.raises(EDMCheckpointError, match=r"no entry 'net' \(found \['augment_pipe', 'dataset_kwargs'"):
        load_edm_checkpoint(path, key="net")
    bad = dict(small_net().init_kwargs, bogus_option=3)
    path = write_official_pickle(tmp_path / "bad.pkl", small_net(), top_kwargs=bad)
    with pytest.raises(EDMCheckpointError, match="bogus_option"):
        load_edm_checkpoint(path)


def test_extra_missing_and_misshapen_weights(tmp_path):
    extra = copy.deepcopy(small_net())
    extra.model.map_layer0.register_parameter("extra", nn.Parameter(torch.zeros(2)))
    with pytest.raises(EDMCheckpointError, match=r"missing keys \[\], unexpected keys \['model.map_layer0.extra'\]"):
        load_edm_checkpoint(write_official_pickle(tmp_path / "a.pkl", extra))
    missing = copy.deepcopy(small_net())
    del missing.model.map_layer1._parameters["bias"]
    with pytest.raises(EDMCheckpointError, match=r"missing keys \['model.map_layer1.bias'\], unexpected keys \[\]"):
        load_edm_checkpoint(write_official_pickle(tmp_path / "b.pkl", missing))
    shape = copy.deepcopy(small_net())
    shape.model.map_label.weight = nn.Parameter(torch.zeros(16, 9))
    with pytest.raises(EDMCheckpointError, match="model.map_label.weight"):
        load_edm_checkpoint(write_official_pickle(tmp_path / "c.pkl", shape))


@pytest.mark.parametrize("keep", [0, 10, 0.5, -1])
def test_truncated_pickle(tmp_path, keep):
    raw = write_official_pickle(tmp_path / "full.pkl", small_net()).read_bytes()
    cut = int(len(raw) * keep) if isinstance(keep, float) else (len(raw) + keep if keep < 0 else keep)
    path = tmp_path / "cut.pkl"
    path.write_bytes(raw[:cut])
    with pytest.raises(EDMCheckpointError, match="truncated or corrupt.*download it again"):
        load_edm_checkpoint(path)


def test_missing_file_says_where_to_get_it(tmp_path):
    path = tmp_path / "models" / "edm-cifar10-32x32-cond-vp.pkl"
    for fn in (load_edm_checkpoint, describe_checkpoint):
        with pytest.raises(FileNotFoundError) as info:
            fn(path)
        msg = str(info.value)
        assert str(path) in msg and "nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl" in msg
        assert "DM-Improves-AT" in msg
    with pytest.raises(FileNotFoundError, match="DM-Improves-AT"):
        load_edm_checkpoint(tmp_path / "edm.pt")
    with pytest.raises(ValueError, match="unknown EDM checkpoint type"):
        load_edm_checkpoint(tmp_path / "edm.bin")


# --------------------------------------------------------------------------------------------------
# Our .pt format.

@pytest.mark.parametrize("config", [VP_SMALL, EDM_SMALL], ids=["VPPrecond", "EDMPrecond"])
def test_pt_round_trip_and_lazy_import(tmp_path, config):
    net = small_net(config)
    path = tmp_path / "edm.pt"
    save_edm(path, net, step=7)
    assert_same_network(net, load_edm_checkpoint(path))
    assert_same_network(net, edm.load_edm_checkpoint(path))  # through edm.py's lazy import
    info = describe_checkpoint(path)
    assert info["class_name"] == config["precond"] and info["init_kwargs"] == net.init_kwargs
    assert info["num_parameters"] == sum(p.numel() for p in net.parameters())
    assert info["other_entries"] == {"step": 7} and info["format"] == "semmix-edm"


def test_pt_sub_checkpoint_by_key(tmp_path):
    net, ema = small_net(seed=0), small_net(seed=1)
    path = tmp_path / "state.pt"
    save_edm(path, net, ema=edm_state(ema))
    assert_same_network(ema, load_edm_checkpoint(path))  # default key "ema"
    assert_same_network(net, load_edm_checkpoint(path, key="net"))  # no such entry: the top-level net
    with pytest.raises(ValueError, match="overwrite"):
        save_edm(path, net, state_dict={})


def test_pt_errors(tmp_path):
    save_checkpoint(tmp_path / "other.pt", {"a": torch.zeros(2)})
    with pytest.raises(EDMCheckpointError, match="not a semmix EDM checkpoint"):
        load_edm_checkpoint(tmp_path / "other.pt")
    state = edm_state(small_net())
    state["state_dict"]["surplus"] = torch.zeros(1)
    save_checkpoint(tmp_path / "surplus.pt", state)
    with pytest.raises(EDMCheckpointError, match=r"unexpected keys \['surplus'\]"):
        load_edm_checkpoint(tmp_path / "surplus.pt")
    marker = tmp_path / "marker"
    torch.save(Payload(os.makedirs, str(marker)), tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        load_edm_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(TypeError, match="save_edm expects"):
        save_edm(tmp_path / "x.pt", nn.Linear(2, 2))
