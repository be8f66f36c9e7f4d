"""CLIP annotation of mixed images (PAPER.md section 2): prototypes, projected lambda, soft labels.

The paper labels every generated image by where its CLIP image embedding lies between the two class
prototypes of its group:

* encoder: OpenAI CLIP ViT-B/32, image encoder only (``model.encode_image``, unnormalised), no prompts;
* prototype ``p_k``: the mean of the (unnormalised) embeddings of all training images of class ``k``
  (``normalize=True`` L2-normalises every embedding first, generated ones included; off by default);
* ``lam_clip = (f - p_c2) . (p_c1 - p_c2) / ||p_c1 - p_c2||^2`` for an image of group ``(c1, c2)`` with
  embedding ``f``: the scalar projection, 1 at ``p_c1``, 0 at ``p_c2``, free to leave [0, 1];
* soft label ``lam' = sigmoid(s (lam_clip - 0.5))``, target ``t[c1] = lam'``, ``t[c2] = 1 - lam'``, with
  ``s`` = 4.0 (CIFAR-10, Tiny-ImageNet) or 2.3 (CIFAR-100) (:data:`SOFT_LABEL_SCALE`).

Bugs of the official code that are *not* reproduced: there only the last image of each group received a
label, images were matched to groups by file-name prefix (``1_0_1`` also matched ``1_0_10``), and the
prototype mean was taken without ``dim``. Here every generated image gets its own label, matched by its
manifest row (``image_id``), and prototypes are per-class means over images.

Layout of an annotation folder ``out_dir``::

    annotation.json            settings (encoder, weights hash, s, normalize, chunk_size, hashes); checked on re-runs
    prototypes.npy             (K, D) float64 class prototypes
    embeddings/chunk_{i:05d}.npy   (rows, D) float32 raw embeddings of manifest rows [i*chunk_size, (i+1)*chunk_size)
    annotations.csv            one row per manifest row: image_id, path, group, seed, c1, c2, lam_index, lam,
                               lam_clip, soft_label (= lam', the target weight of c1)

Annotation is sharded and resumable: rank ``r`` of ``w`` embeds the chunks ``i % w == r`` that are not on
disk yet (written atomically), and rank 0 assembles ``annotations.csv`` once every chunk exists. Training
reads the table with :func:`read_annotations` and builds target vectors with :func:`soft_targets`.

Weights are always read without running code from the file: ``torch.load(weights_only=True)`` or
safetensors, then ``load_state_dict(strict=True)`` (see :func:`load_encoder`).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import logging
import math
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .distributed import is_on, rank_and_world, torchrun_session
from .io import atomic_path, read_json, settings_diff, sha256_file, write_json
from .mixing import PLAN_COLUMNS, check_images, read_manifest
from .progress import tqdm

__all__ = [
    "SOFT_LABEL_SCALE", "DEFAULT_SOFT_LABEL_SCALE", "ANNOTATION_COLUMNS", "AnnotationMismatchError",
    "soft_label_scale", "load_encoder", "load_weights_file", "ImageFiles", "TensorImages", "encode_images",
    "compute_prototypes", "class_prototypes", "project_lambda", "soft_label", "annotate", "assemble_annotations",
    "read_annotations", "soft_targets", "main",
]

log = logging.getLogger(__name__)

#: The paper's sigmoid scale ``s`` per dataset.
SOFT_LABEL_SCALE: dict[str, float] = {"cifar10": 4.0, "cifar100": 2.3, "tiny-imagenet": 4.0}
#: ``s`` for datasets the paper does not cover (digits, folder): the CIFAR-10 value.
DEFAULT_SOFT_LABEL_SCALE = 4.0
#: Columns of ``annotations.csv``, in order.
ANNOTATION_COLUMNS = ["image_id", "path", "group", "seed", "c1", "c2", "lam_index", "lam", "lam_clip", "soft_label"]
_INT_COLUMNS = ["group", "seed", "c1", "c2", "lam_index"]
_FLOAT_COLUMNS = ["lam", "lam_clip", "soft_label"]
_FORMAT = "semmix.annotation/1"
SETTINGS_FILE = "annotation.json"
TABLE_FILE = "annotations.csv"
PROTOTYPES_FILE = "prototypes.npy"
EMBEDDINGS_DIR = "embeddings"
_WEIGHT_FILE_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                      "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin", "ViT-B-32.pt")
_HOW_TO_GET_WEIGHTS = (
    "The paper's encoder is OpenAI's CLIP ViT-B/32. On a machine with internet, either run "
    "`python -c \"import open_clip; open_clip.create_model('ViT-B-32-quickgelu', pretrained='openai')\"` and copy "
    "the file it caches (~/.cache/huggingface/hub/models--timm--vit_base_patch32_clip_224.openai/snapshots/*/"
    "open_clip_pytorch_model.bin or open_clip_model.safetensors), or download OpenAI's own ViT-B-32.pt from "
    "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
    "/ViT-B-32.pt; then pass the file's path as `pretrained` (CLI: --pretrained PATH).")


class AnnotationMismatchError(ValueError):
    """An annotation folder already holds work done with other settings."""


# --------------------------------------------------------------------------------------------------
# The method: prototypes, projection, soft labels.

def soft_label_scale(dataset: str) -> float:
    """The paper's ``s`` for ``dataset`` (:data:`SOFT_LABEL_SCALE`), else :data:`DEFAULT_SOFT_LABEL_SCALE`."""
    return float(SOFT_LABEL_SCALE.get(dataset, DEFAULT_SOFT_LABEL_SCALE))


def class_prototypes(embeddings, labels, num_classes: int, normalize: bool = False) -> np.ndarray:
    """(K, D) float64 class prototypes: the mean embedding of each class (``labels`` in ``0..K-1``).

    With ``normalize=True`` every embedding is L2-normalised before averaging. A class without images, a
    label outside ``0..K-1`` or a non-finite embedding raise ``ValueError``. The means are computed in
    float64 in a fixed order (rows sorted stably by class), so they do not depend on anything but the data.
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (N, D) array, got shape {emb.shape}")
    emb = emb.astype(np.float64)
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or infinite values")
    labels = np.asarray(labels)
    if labels.shape != (emb.shape[0],):
        raise ValueError(f"need one label per embedding: {emb.shape[0]} embeddings, labels of shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
    if bad.size:
        raise ValueError(f"labels {bad[:10].tolist()} are outside 0..{num_classes - 1}")
    counts = np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(f"class(es) {empty[:20].tolist()} have no training images: cannot compute their "
                         f"prototypes ({num_classes} classes, {emb.shape[0]} images)")
    if normalize:
        emb = _l2_normalize(emb, "a training embedding")
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sums = np.add.reduceat(emb[order], starts, axis=0)
    return sums / counts[:, None]


def project_lambda(f, p_c1, p_c2, *, classes=None, rtol: float = 1e-6, atol: float = 1e-12) -> np.ndarray:
    """``lam_clip = (f - p_c2) . (p_c1 - p_c2) / ||p_c1 - p_c2||^2``, row by row, in float64.

    ``f`` is (N, D) (or (D,)); ``p_c1`` and ``p_c2`` are (N, D) or (D,) and broadcast against it. Returns
    shape ``f.shape[:-1]`` (N,). The value is 1 at ``p_c1``, 0 at ``p_c2``, 0.5 half-way, and ignores any
    component of ``f - p_c2`` orthogonal to ``p_c1 - p_c2``; it is not clipped to [0, 1].

    Prototypes that (nearly) coincide, ``||p_c1 - p_c2|| <= atol + rtol * max(||p_c1||, ||p_c2||)``, raise
    ``ValueError`` naming the class pair when ``classes=(c1, c2)`` (arrays of class indices, one per row or
    scalars) is given, else the rows.
    """
    f = np.asarray(f, dtype=np.float64)
    p1 = np.asarray(p_c1, dtype=np.float64)
    p2 = np.asarray(p_c2, dtype=np.float64)
    if f.ndim not in (1, 2) or p1.ndim not in (1, 2) or p2.ndim not in (1, 2):
        raise ValueError(f"expected (N, D) or (D,) arrays, got shapes {f.shape}, {p1.shape}, {p2.shape}")
    try:
        shape = np.broadcast_shapes(f.shape, p1.shape, p2.shape)
    except ValueError as err:
        raise ValueError(f"shapes do not match: f {f.shape}, p_c1 {p1.shape}, p_c2 {p2.shape}") from err
    d = p1 - p2
    dd = (d * d).sum(axis=-1)
    scale = np.maximum(np.sqrt((p1 * p1).sum(axis=-1)), np.sqrt((p2 * p2).sum(axis=-1)))
    close = np.broadcast_to(np.sqrt(dd) <= atol + rtol * scale, shape[:-1])
    if close.any():
        rows = np.flatnonzero(close)
        if classes is not None:
            c1 = np.broadcast_to(np.asarray(classes[0]), shape[:-1]).reshape(-1)
            c2 = np.broadcast_to(np.asarray(classes[1]), shape[:-1]).reshape(-1)
            pairs = sorted({(int(c1[i]), int(c2[i])) for i in rows})
            raise ValueError(f"the prototypes of class pair(s) {pairs[:10]} coincide (||p_c1 - p_c2|| ~ 0): "
                             "lam_clip is undefined for them")
        raise ValueError(f"p_c1 and p_c2 coincide (||p_c1 - p_c2|| ~ 0) in row(s) {rows[:10].tolist()}: "
                         "lam_clip is undefined")
    if not (np.isfinite(f).all() and np.isfinite(d).all() and np.isfinite(p2).all()):
        raise ValueError("embeddings or prototypes contain NaN or infinite values")
    return ((f - p2) * d).sum(axis=-1) / dd


def soft_label(lam_clip, s: float):
    """``sigmoid(s * (lam_clip - 0.5))`` in float64 (the target weight of ``c1``); ``s`` finite and positive.

    Exactly 0.5 at ``lam_clip = 0.5``; increasing in ``lam_clip``. Mathematically in (0, 1); float64
    saturates to 1 (or 0) only for ``|s (lam_clip - 0.5)| > ~37``.
    """
    s = _check_scale(s)
    z = s * (np.asarray(lam_clip, dtype=np.float64) - 0.5)
    with np.errstate(over="ignore"):
        e = np.exp(-np.abs(z))
        out = np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return float(out) if out.ndim == 0 else out


def soft_targets(table: pd.DataFrame, num_classes: int, dtype=np.float64) -> np.ndarray:
    """(N, K) target vectors of an annotation table: ``t[c1] = soft_label``, ``t[c2] = 1 - soft_label``."""
    for col in ("c1", "c2", "soft_label"):
        if col not in table.columns:
            raise ValueError(f"table lacks column {col!r}; read it with read_annotations")
    c1 = table["c1"].to_numpy(dtype=np.int64)
    c2 = table["c2"].to_numpy(dtype=np.int64)
    lam = table["soft_label"].to_numpy(dtype=np.float64)
    num_classes = int(num_classes)
    if len(table) and (min(c1.min(), c2.min()) < 0 or max(c1.max(), c2.max()) >= num_classes):
        raise ValueError(f"class indices outside 0..{num_classes - 1} in the table")
    if (c1 == c2).any():
        raise ValueError("rows with c1 == c2 in the table")
    if not (np.isfinite(lam).all() and ((lam >= 0) & (lam <= 1)).all()):
        raise ValueError("soft_label must be finite and in [0, 1]")
    t = np.zeros((len(table), num_classes), dtype=np.float64)
    rows = np.arange(len(table))
    t[rows, c1] = lam
    t[rows, c2] = 1.0 - lam
    return t.astype(dtype, copy=False)


# --------------------------------------------------------------------------------------------------
# The encoder.

def load_encoder(model_name: str, pretrained: str | os.PathLike | None, device="cpu", *,
                 quick_gelu: bool | None = None, allow_torchscript: bool = False, cache_dir: str | None = None):
    """An open_clip model in eval mode on ``device`` and its eval preprocessing: ``(model, preprocess)``.

    ``model_name`` is any open_clip architecture (``open_clip.list_models()``, "/" read as "-", so
    ``"ViT-B/32"`` works; configs added with ``open_clip.add_model_config`` included). ``pretrained`` is

    * a weights file (or a folder holding ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``):
      a state dict saved with ``torch.save`` (read with ``torch.load(weights_only=True)``, optionally under
      ``"state_dict"`` and with ``module.`` prefixes), a ``.safetensors`` file, or OpenAI's TorchScript
      archive ``ViT-B-32.pt`` (see below);
    * an open_clip tag such as ``"openai"`` (downloaded by open_clip into its cache: needs internet or a
      filled Hugging Face cache), whose file is then read the same way;
    * ``None``: random weights (a warning; for tests only).

    The weights must fit the architecture exactly (``load_state_dict(strict=True)``, no resizing of position
    embeddings): another model's file raises ``ValueError`` naming mismatched keys. A missing file raises
    ``FileNotFoundError`` that says where to get OpenAI's ViT-B/32 weights; an unknown model name raises
    ``ValueError`` with close matches.

    Why not ``open_clip.create_model(name, pretrained=path)``: open_clip 3.3 does read files with
    ``torch.load(weights_only=True)``, but retries with a plain ``torch.load(path)`` (whose default depends
    on the torch version and the ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` variable) when that raises
    ``TypeError``; its legacy ``load_openai_model`` (not used by ``create_model``) calls ``torch.jit.load`` and
    plain ``torch.load``. It also cannot open OpenAI's TorchScript ``ViT-B-32.pt`` (``weights_only=True``
    refuses TorchScript archives with a ``RuntimeError``) and it silently interpolates position embeddings
    of another size. This function reads the tensors itself and loads them strictly.

    TorchScript archives run TorchScript code when loaded, so one is only opened (``torch.jit.load``) when its
    SHA-256 equals that of an official OpenAI file listed by open_clip (the hash is part of OpenAI's URL), or
    with ``allow_torchscript=True`` for a file you trust.

    ``quick_gelu``: OpenAI's CLIP uses QuickGELU, but open_clip 3.3's ``"ViT-B-32"`` config uses GELU (its
    ``"ViT-B-32-quickgelu"`` has QuickGELU) and ``create_model("ViT-B-32", "openai")`` only warns about it.
    ``None`` (default) takes the value of the weights' open_clip tag when known (a tag, or a file identified
    by its hash), else the architecture's; with an unidentified file for an architecture whose OpenAI
    weights need QuickGELU, a warning says to choose explicitly.

    The model carries ``model.semmix_encoder``, a dict describing it (name, weights file and SHA-256 or tag,
    quick_gelu, preprocessing) that :func:`annotate` records in ``annotation.json``.
    """
    import open_clip
    from open_clip import pretrained as oc_pretrained
    from open_clip.transform import PreprocessCfg, image_transform_v2

    name = _check_model_name(model_name)
    model_cfg = open_clip.get_model_config(name)
    tag_cfg: dict = {}
    info: dict = {"model": name}
    path = None
    if pretrained is None:
        info["weights"] = None
        warnings.warn(f"load_encoder({name!r}, pretrained=None): random weights, embeddings are meaningless "
                      "for annotation", stacklevel=2)
    else:
        text = os.fspath(pretrained)
        if os.path.isdir(text):
            path = _weights_in_folder(Path(text))
        elif os.path.isfile(text):
            path = Path(text)
        elif oc_pretrained.is_pretrained_cfg(name, text) and not _looks_like_path(text):
            tag_cfg = oc_pretrained.get_pretrained_cfg(name, text)
            try:
                path = Path(oc_pretrained.download_pretrained(tag_cfg, cache_dir=cache_dir))
            except Exception as err:
                raise FileNotFoundError(
                    f"could not get the weights of open_clip tag {text!r} for {name} ({type(err).__name__}: "
                    f"{str(err)[:300]}); without internet open_clip can only use its cache. "
                    + _HOW_TO_GET_WEIGHTS) from err
            info["tag"] = text
        else:
            tags = oc_pretrained.list_pretrained_tags_by_model(name)
            raise FileNotFoundError(
                f"weights file {text} not found (nor is it an open_clip tag of {name}"
                f"{': ' + ', '.join(tags[:12]) if tags else ''}). " + _HOW_TO_GET_WEIGHTS)
        sha = sha256_file(path)
        info.update(weights=str(path), weights_sha256=sha)
        known = _official_tag(sha)
        if known is not None and not tag_cfg:
            known_model, known_tag = known
            if known_model.replace("-quickgelu", "") != name.replace("-quickgelu", ""):
                raise ValueError(f"{path} is the official {known_model} / {known_tag} checkpoint, "
                                 f"not weights for {name}")
            tag_cfg = oc_pretrained.get_pretrained_cfg(known_model, known_tag)
            info["identified_as"] = f"{known_model}/{known_tag}"
    if quick_gelu is None:
        if tag_cfg:
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        else:
            quick_gelu = bool(model_cfg.get("quick_gelu", False))
            openai_cfg = oc_pretrained.get_pretrained_cfg(name, "openai")
            if path is not None and openai_cfg.get("quick_gelu") and not quick_gelu:
                warnings.warn(
                    f"{name} uses GELU in open_clip, but OpenAI's {name} weights were trained with QuickGELU and "
                    f"{path} is not identified: if it holds OpenAI's weights, pass quick_gelu=True (CLI: "
                    f"--quick-gelu on) or use the model name {name}-quickgelu", stacklevel=2)
    info["quick_gelu"] = bool(quick_gelu)

    pp_override = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    logging.getLogger().disabled, was = True, logging.getLogger().disabled  # open_clip logs "randomly initialised"
    try:
        model = open_clip.create_model(name, pretrained=None, device="cpu", force_preprocess_cfg=pp_override,
                                       quick_gelu=bool(quick_gelu))
    finally:
        logging.getLogger().disabled = was
    if path is not None:
        state = load_weights_file(path, allow_torchscript=allow_torchscript or "identified_as" in info)
        _load_strict(model, state, name, path)
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    info["preprocess"] = _describe_transform(preprocess)
    model = model.to(device).eval()
    model.semmix_encoder = info
    return model, preprocess


def load_weights_file(path, allow_torchscript: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, read without running code from it: ``.safetensors`` via safetensors,
    else ``torch.load(weights_only=True)`` (unwrapping ``{"state_dict": ...}`` and ``module.`` prefixes).

    A TorchScript archive (OpenAI's ``.pt`` files) raises ``ValueError`` unless ``allow_torchscript`` (then
    ``torch.jit.load``, which runs the archive's TorchScript code). A truncated or foreign file raises
    ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found. " + _HOW_TO_GET_WEIGHTS)
    if path.suffix in (".npz", ".npy"):
        raise ValueError(f"{path}: numpy (big_vision) weights are not supported; use a PyTorch state dict")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            obj = load_file(str(path), device="cpu")
        except Exception as err:
            raise ValueError(f"cannot read safetensors file {path} ({type(err).__name__}: {str(err)[:200]}); "
                             "it may be truncated") from err
    elif _is_torchscript(path):
        if not allow_torchscript:
            raise ValueError(
                f"{path} is a TorchScript archive (like OpenAI's ViT-B-32.pt); loading one runs the TorchScript "
                "code inside it, so it is refused unless its SHA-256 is that of an official OpenAI file or you "
                "pass allow_torchscript=True (CLI: --allow-torchscript) for a file you trust. Alternatively use "
                "the state dict open_clip_pytorch_model.bin / open_clip_model.safetensors.")
        try:
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as err:
            raise ValueError(f"cannot load TorchScript archive {path} ({type(err).__name__}: "
                             f"{str(err)[:200]})") from err
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            first = (str(err).splitlines() or [""])[0][:200]
            raise ValueError(
                f"cannot read weights file {path} ({type(err).__name__}: {first}): it may be truncated, or it "
                "is not a plain state dict (pickles that need code are refused: weights_only=True)") from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is not a tensor; not a state dict")
        state[key[7:] if key.startswith("module.") else key] = value
    return state


def _load_strict(model: torch.nn.Module, state: dict, name: str, path) -> None:
    """Adapt a state dict the way open_clip does (old text-tower layout, scalar logit_scale, TorchScript
    extras), then load it with ``strict=True`` after naming every mismatch in one ``ValueError``."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    state = convert_state_dict(model, dict(state))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    own = model.state_dict()
    nonpersistent = {n for n, _ in model.named_buffers()} - set(own)
    for key in ("input_resolution", "context_length", "vocab_size", "text.transformer.embeddings.position_ids",
                *nonpersistent):
        state.pop(key, None)
    for key in ("logit_scale", "logit_bias"):
        if key in state and key in own and state[key].ndim != own[key].ndim and state[key].numel() == own[key].numel():
            state[key] = state[key].reshape(own[key].shape)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{path} does not hold weights for open_clip model {name}:"]
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:5])};")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:5])};")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) (file vs model), e.g. {'; '.join(shapes[:5])};")
        parts.append("pass the weights of this architecture, or the architecture of these weights.")
        raise ValueError(" ".join(parts))
    model.load_state_dict(state, strict=True)


def _check_model_name(model_name: str) -> str:
    import open_clip

    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    if model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"{model_name!r}: hf-hub:/local-dir: model names are not supported; pass a built-in "
                         "architecture name and a weights file")
    name = model_name.replace("/", "-")
    if open_clip.get_model_config(name) is None:
        models = open_clip.list_models()
        close = difflib.get_close_matches(name, models, n=8, cutoff=0.5)
        close += [m for m in models if name.lower() in m.lower() and m not in close][:8]
        raise ValueError(f"unknown open_clip model {model_name!r}; close matches: {close or 'none'} "
                         f"({len(models)} models in open_clip.list_models())")
    return name


def _looks_like_path(text: str) -> bool:
    return (os.sep in text or "/" in text or text.startswith(".")
            or text.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")))


def _weights_in_folder(folder: Path) -> Path:
    for fname in _WEIGHT_FILE_NAMES:
        if (folder / fname).is_file():
            return folder / fname
    raise FileNotFoundError(f"no weights file ({', '.join(_WEIGHT_FILE_NAMES)}) in folder {folder}. "
                            + _HOW_TO_GET_WEIGHTS)


def _official_sha256() -> dict[str, tuple[str, str]]:
    """SHA-256 of OpenAI's files -> (model, tag), from the hashes in the URLs open_clip lists."""
    from open_clip import pretrained as oc_pretrained

    found = {}
    for model, tag in oc_pretrained.list_pretrained():
        url = oc_pretrained.get_pretrained_cfg(model, tag).get("url", "")
        if "openaipublic" in url:
            sha = url.split("/")[-2]
            if re.fullmatch(r"[0-9a-f]{64}", sha) and not model.endswith("-quickgelu"):
                found[sha] = (model, tag)
    return found


def _official_tag(sha: str) -> tuple[str, str] | None:
    return _official_sha256().get(sha)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def _describe_transform(transform) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def _parameters_sha256(model: torch.nn.Module) -> str:
    """Hash of a model's state dict (names, dtypes, shapes, bytes), independent of its device."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Images and embeddings.

class ImageFiles(Dataset):
    """Image files as PIL images: item ``i`` is ``Image.open(root / relative_paths[i])`` (mode as stored,
    e.g. "L" or "RGB"), or ``transform`` of it. ``root=None`` uses the paths as they are."""

    def __init__(self, root, relative_paths: Sequence, transform=None):
        self.root = None if root is None else Path(root)
        self.paths = [os.fspath(p) for p in relative_paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index] if self.root is None else self.root / self.paths[index]
        with Image.open(path) as img:
            img.load()
        return img if self.transform is None else self.transform(img)


class TensorImages(Dataset):
    """A dataset of normalised (C, H, W) tensors (e.g. ``DataSplits.train_plain``) as 8-bit PIL images.

    Item ``i`` is ``(PIL image, label)``: ``x * std + mean`` clipped to [0, 1], times 255, rounded to uint8
    (this recovers the stored 8-bit pixels exactly for images that ``ToTensor`` + ``Normalize`` made),
    mode "L" for one channel and "RGB" for three. :attr:`targets` are the dataset's labels.
    """

    def __init__(self, dataset, mean: Sequence[float], std: Sequence[float]):
        self.dataset = dataset
        self.mean = np.asarray(mean, dtype=np.float64).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float64).reshape(-1, 1, 1)
        if self.mean.shape != self.std.shape:
            raise ValueError(f"mean and std differ in length: {len(mean)} vs {len(std)}")

    @property
    def targets(self) -> list[int]:
        if hasattr(self.dataset, "targets"):
            return [int(y) for y in self.dataset.targets]
        return [int(self.dataset[i][1]) for i in range(len(self.dataset))]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x, y = self.dataset[index]
        x = np.asarray(torch.as_tensor(x).detach().cpu(), dtype=np.float64)
        if x.ndim != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f"expected (1 or 3, H, W) tensors, got shape {x.shape}")
        if self.mean.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"{x.shape[0]}-channel image but {self.mean.shape[0]} mean values")
        pixels = np.rint(np.clip(x * self.std + self.mean, 0.0, 1.0) * 255.0).astype(np.uint8)
        pil = Image.fromarray(pixels[0]) if pixels.shape[0] == 1 else Image.fromarray(pixels.transpose(1, 2, 0))
        return pil, int(y)


class _Preprocessed(Dataset):
    def __init__(self, dataset, preprocess):
        self.dataset, self.preprocess = dataset, preprocess

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if isinstance(item, (tuple, list)):
            item = item[0]
        if not isinstance(item, Image.Image):
            raise TypeError(f"expected PIL images (or (image, ...) tuples), got {type(item).__name__}; wrap "
                            "normalised tensors in TensorImages and files in ImageFiles")
        return self.preprocess(item)


def encode_images(model, preprocess, images, batch_size: int = 256, device=None, num_workers: int = 0,
                  progress: bool = True) -> np.ndarray:
    """(N, D) float32 unnormalised image embeddings ``model.encode_image(preprocess(image))``.

    ``images`` is a Dataset of PIL images or ``(PIL image, ...)`` tuples (:class:`ImageFiles`,
    :class:`TensorImages`, ...) or a sequence of image paths. Batched through a DataLoader (``num_workers``
    processes run ``preprocess``), in order, under ``torch.inference_mode``; autocast (float16) only on CUDA.
    ``device`` defaults to the model's.
    """
    if isinstance(images, (str, os.PathLike)):
        raise TypeError("pass a sequence of paths (or a Dataset), not a single path")
    if not isinstance(images, Dataset):
        images = list(images)
        if images and not isinstance(images[0], Image.Image):
            images = ImageFiles(None, images)
    if len(images) == 0:
        raise ValueError("no images to encode")
    if getattr(model, "training", False):
        raise ValueError("the encoder is in training mode; call model.eval()")
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    data = _Preprocessed(images, preprocess) if isinstance(images, Dataset) else _PILList(images, preprocess)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=int(num_workers),
                        pin_memory=device.type == "cuda")
    out = []
    amp = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else _nullcontext()
    with torch.inference_mode(), amp:
        for x in tqdm(loader, disable=not progress, desc="encoding", unit="batch"):
            out.append(model.encode_image(x.to(device, non_blocking=True)).float().cpu())
    emb = torch.cat(out).numpy().astype(np.float32, copy=False)
    if emb.ndim != 2 or emb.shape[0] != len(data):
        raise ValueError(f"encoder returned shape {emb.shape} for {len(data)} images; expected (N, D)")
    return emb


class _PILList(Dataset):
    def __init__(self, images, preprocess):
        self.images, self.preprocess = images, preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.preprocess(self.images[index])


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def compute_prototypes(model, preprocess, splits, normalize: bool = False, batch_size: int = 256, device=None,
                       num_workers: int = 0, progress: bool = True) -> np.ndarray:
    """Prototypes from a :class:`~semmix_lib.data.DataSplits`' training images (``train_plain``, as 8-bit
    PIL images through :class:`TensorImages`): ``class_prototypes(encode_images(...), labels, K)``."""
    images = TensorImages(splits.train_plain, splits.mean, splits.std)
    emb = encode_images(model, preprocess, images, batch_size=batch_size, device=device,
                        num_workers=num_workers, progress=progress)
    return class_prototypes(emb, np.asarray(images.targets, dtype=np.int64), splits.num_classes, normalize)


# --------------------------------------------------------------------------------------------------
# Annotating a generation folder.

def annotate(gen_dir, out_dir, encoder, prototypes, s: float, *, normalize: bool = False, chunk_size: int = 4096,
             batch_size: int = 256, device=None, num_workers: int = 0, rank: int | None = None,
             world_size: int | None = None, progress: bool = True, encoder_info: dict | None = None,
             extra: dict | None = None) -> pd.DataFrame | None:
    """Label every image of the generation folder ``gen_dir`` into ``out_dir`` (layout: module docstring).

    ``encoder`` is ``(model, preprocess)`` (see :func:`load_encoder`; embedded with :func:`encode_images`)
    or a function ``embed_fn(paths) -> (n, D) array`` called once per chunk with the chunk's image paths.
    ``prototypes`` is (K, D) (:func:`class_prototypes`, computed with the same ``normalize``); ``s`` the
    sigmoid scale (:func:`soft_label_scale`). With ``normalize=True`` generated embeddings are L2-normalised
    too before the projection. ``rank``/``world_size`` default to torch.distributed's when initialised, else
    0 and 1.

    First the folder is checked (:func:`semmix_lib.mixing.check_images`: missing or extra PNGs are named),
    then ``annotation.json`` is written or, if present, compared with these settings (encoder, weights and
    parameter hashes, ``s``, ``normalize``, ``chunk_size``, manifest and prototype hashes, ``extra``):
    a difference raises :class:`AnnotationMismatchError`. This rank then embeds its chunks (``i % w == r``)
    that are not on disk. Rank 0 (after a barrier under torch.distributed) assembles ``annotations.csv``
    when all chunks exist and returns the table (:func:`read_annotations`); otherwise it returns ``None``
    (other ranks, or rank 0 of a run without torch.distributed whose other ranks have not finished: call
    :func:`assemble_annotations` or ``annotate`` again once they have).
    """
    gen_dir, out_dir = Path(gen_dir), Path(out_dir)
    s = _check_scale(s)
    chunk_size = _check_positive_int(chunk_size, "chunk_size")
    check_images(gen_dir)
    manifest = _check_manifest(read_manifest(gen_dir), gen_dir)
    prototypes = _check_prototypes(prototypes, manifest, normalize)
    embed_fn, enc_desc = _embedder(encoder, encoder_info, batch_size, device, num_workers)
    settings = _settings(gen_dir, manifest, enc_desc, s, normalize, chunk_size, prototypes, extra)
    rank, world_size = rank_and_world(rank, world_size)
    sync = is_on()
    _prepare_out(out_dir, settings, prototypes, rank, sync)

    n_chunks = math.ceil(len(manifest) / chunk_size)
    todo = [i for i in range(rank, n_chunks, world_size) if not _chunk_path(out_dir, i).exists()]
    dim = prototypes.shape[1]
    for i in tqdm(todo, disable=not progress, unit="chunk",
                  desc=f"annotating (rank {rank}/{world_size})" if world_size > 1 else "annotating"):
        rows = manifest.iloc[i * chunk_size:(i + 1) * chunk_size]
        emb = np.asarray(embed_fn([gen_dir / p for p in rows["path"]]))
        if emb.shape != (len(rows), dim):
            raise ValueError(f"the encoder returned shape {emb.shape} for chunk {i} ({len(rows)} images); "
                             f"expected ({len(rows)}, {dim}) to match the prototypes")
        if not np.isfinite(emb).all():
            raise ValueError(f"the encoder returned NaN or infinite embeddings for chunk {i}")
        with atomic_path(_chunk_path(out_dir, i)) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, emb.astype(np.float32), allow_pickle=False)
    if sync:
        torch.distributed.barrier()
    if rank != 0:
        return None
    missing = [i for i in range(n_chunks) if not _chunk_path(out_dir, i).exists()]
    if missing:
        log.warning("%s: %d of %d chunks not embedded yet (e.g. %s); annotations.csv is assembled once the other "
                    "ranks are done", out_dir, len(missing), n_chunks, missing[:5])
        return None
    return assemble_annotations(out_dir, gen_dir)


def assemble_annotations(out_dir, gen_dir) -> pd.DataFrame:
    """Write ``out_dir/annotations.csv`` from the chunk embeddings, prototypes and settings in ``out_dir``
    (all chunks must exist; the generation folder's manifest must be the one annotated) and return it as
    :func:`read_annotations` reads it."""
    out_dir, gen_dir = Path(out_dir), Path(gen_dir)
    settings = _read_settings(out_dir)
    manifest = _check_manifest(read_manifest(gen_dir), gen_dir)
    if _sha256_or_none(gen_dir / "manifest.csv") != settings["manifest_sha256"] or \
            _sha256_or_none(gen_dir / "generation.json") != settings["generation_sha256"]:
        raise AnnotationMismatchError(f"{gen_dir} is not the generation folder annotated in {out_dir} "
                                      "(its manifest.csv or generation.json differ)")
    prototypes = _load_prototypes(out_dir, settings)
    chunk_size, s, normalize = settings["chunk_size"], settings["s"], settings["normalize"]
    n_chunks = math.ceil(len(manifest) / chunk_size)
    missing = [i for i in range(n_chunks) if not _chunk_path(out_dir, i).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {n_chunks} embedding chunks missing in {out_dir / EMBEDDINGS_DIR}"
                                f" (e.g. {', '.join(_chunk_path(out_dir, i).name for i in missing[:5])}); "
                                "run annotate for every rank first")
    lam_clip = np.empty(len(manifest), dtype=np.float64)
    c1_all = manifest["c1"].to_numpy(dtype=np.int64)
    c2_all = manifest["c2"].to_numpy(dtype=np.int64)
    for i in range(n_chunks):
        lo, hi = i * chunk_size, min((i + 1) * chunk_size, len(manifest))
        path = _chunk_path(out_dir, i)
        try:
            emb = np.load(path, allow_pickle=False)
        except Exception as err:
            raise ValueError(f"cannot read {path} ({type(err).__name__}: {err}); delete it and re-run annotate "
                             "to recompute that chunk") from err
        if emb.shape != (hi - lo, prototypes.shape[1]) or not np.isfinite(emb).all():
            raise ValueError(f"{path} holds shape {emb.shape} (or non-finite values), expected "
                             f"({hi - lo}, {prototypes.shape[1]}); delete it and re-run annotate")
        emb = emb.astype(np.float64)
        if normalize:
            emb = _l2_normalize(emb, f"an embedding of chunk {i}")
        c1, c2 = c1_all[lo:hi], c2_all[lo:hi]
        lam_clip[lo:hi] = project_lambda(emb, prototypes[c1], prototypes[c2], classes=(c1, c2))
    table = manifest[["image_id", "path", "group", "seed", "c1", "c2", "lam_index", "lam"]].copy()
    table["lam_clip"] = lam_clip
    table["soft_label"] = soft_label(lam_clip, s)
    with atomic_path(out_dir / TABLE_FILE) as tmp:
        table[ANNOTATION_COLUMNS].to_csv(tmp, index=False)
    return read_annotations(out_dir, gen_dir)


def read_annotations(out_dir, gen_dir=None) -> pd.DataFrame:
    """``out_dir/annotations.csv``, validated: the columns of :data:`ANNOTATION_COLUMNS` with int64 / float64 /
    string dtypes, no NaN, unique ``image_id``, ``0 <= c1 < c2 < K``, ``soft_label`` in [0, 1] and equal to
    ``sigmoid(s (lam_clip - 0.5))`` for the folder's ``s``, every group complete (``n_mix`` rows with
    ``lam_index`` 0..n_mix-1, one seed and class pair). With ``gen_dir`` the rows must be exactly the
    generation manifest's (missing and extra image ids are named). Raises ``ValueError`` otherwise."""
    out_dir = Path(out_dir)
    settings = _read_settings(out_dir)
    path = out_dir / TABLE_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {TABLE_FILE} in {out_dir}: annotation not finished (run annotate for every "
                                "rank, then assemble_annotations)")
    table = pd.read_csv(path, dtype={"image_id": str, "path": str})
    where = f"{path}:"
    absent = [c for c in ANNOTATION_COLUMNS if c not in table.columns]
    if absent:
        raise ValueError(f"{where} missing column(s) {absent}")
    table = table[ANNOTATION_COLUMNS]
    nan = table.isna()
    if nan.to_numpy().any():
        cols = [c for c in ANNOTATION_COLUMNS if nan[c].any()]
        rows = table.index[nan.any(axis=1)]
        ids = table.loc[rows, "image_id"].fillna("?").tolist()
        raise ValueError(f"{where} {len(rows)} row(s) with NaN/empty values in column(s) {cols}, e.g. image ids "
                         f"{ids[:5]}")
    for col in _INT_COLUMNS:
        if not pd.api.types.is_integer_dtype(table[col]):
            raise ValueError(f"{where} column {col!r} must hold integers, got dtype {table[col].dtype}")
        table[col] = table[col].astype(np.int64)
    for col in _FLOAT_COLUMNS:
        if not pd.api.types.is_numeric_dtype(table[col]):
            raise ValueError(f"{where} column {col!r} must hold numbers, got dtype {table[col].dtype}")
        table[col] = table[col].astype(np.float64)
        if not np.isfinite(table[col].to_numpy()).all():
            raise ValueError(f"{where} column {col!r} holds infinite values")
    dup = table["image_id"][table["image_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{where} duplicate image ids {dup.tolist()[:5]}")
    if gen_dir is not None:
        manifest = read_manifest(gen_dir)
        have, want = set(table["image_id"]), set(manifest["image_id"])
        missing = [i for i in manifest["image_id"] if i not in have]
        extra = [i for i in table["image_id"] if i not in want]
        if missing or extra:
            msg = [f"{where} the image ids differ from the manifest of {gen_dir} ({len(manifest)} images):"]
            if missing:
                msg.append(f"{len(missing)} missing, e.g. {', '.join(missing[:5])};")
            if extra:
                msg.append(f"{len(extra)} not in the manifest, e.g. {', '.join(extra[:5])}")
            raise ValueError(" ".join(msg))
        ref = manifest.set_index("image_id").loc[table["image_id"], PLAN_COLUMNS[1:]]
        for col in PLAN_COLUMNS[1:]:
            a, b = table[col].to_numpy(), ref[col].to_numpy()
            same = np.isclose(a, b, rtol=0, atol=1e-12) if col == "lam" else (a == b)
            if not np.all(same):
                ids = table.loc[~same, "image_id"].tolist()
                raise ValueError(f"{where} column {col!r} differs from the manifest of {gen_dir} for {ids[:5]}")
    K, n_mix = int(settings["num_classes"]), int(settings["n_mix"])
    c1, c2 = table["c1"].to_numpy(), table["c2"].to_numpy()
    bad = (c1 < 0) | (c1 >= c2) | (c2 >= K)
    if bad.any():
        raise ValueError(f"{where} class pairs must satisfy 0 <= c1 < c2 < {K}; bad rows: "
                         f"{table.loc[bad, 'image_id'].tolist()[:5]}")
    lam_p = table["soft_label"].to_numpy()
    if ((lam_p < 0) | (lam_p > 1)).any():
        outside = table.loc[(lam_p < 0) | (lam_p > 1), "image_id"].tolist()
        raise ValueError(f"{where} soft_label outside [0, 1] for {outside[:5]}")
    expect = soft_label(table["lam_clip"].to_numpy(), settings["s"])
    off = ~np.isclose(lam_p, expect, rtol=1e-12, atol=1e-15)
    if off.any():
        raise ValueError(f"{where} soft_label != sigmoid(s (lam_clip - 0.5)) with s = {settings['s']} for "
                         f"{table.loc[off, 'image_id'].tolist()[:5]}")
    lam = table["lam"].to_numpy()
    lam_index = table["lam_index"].to_numpy()
    off = (lam_index < 0) | (lam_index >= n_mix)
    if off.any() or not np.allclose(lam, np.linspace(0.0, 1.0, n_mix)[np.clip(lam_index, 0, n_mix - 1)],
                                    rtol=0, atol=1e-12):
        raise ValueError(f"{where} lam_index must be in 0..{n_mix - 1} and lam = linspace(0, 1, {n_mix})[lam_index]")
    by_group = table.groupby("group", sort=True)
    sizes = by_group["lam_index"].nunique()
    counts = by_group.size()
    spread = by_group[["seed", "c1", "c2"]].nunique().max(axis=1)
    incomplete = sizes.index[(sizes != n_mix) | (counts != n_mix) | (spread != 1)].tolist()
    if incomplete:
        detail = [f"group {g}: {int(counts[g])} rows, lam_index "
                  f"{sorted(int(x) for x in table.loc[table['group'] == g, 'lam_index'])}" for g in incomplete[:3]]
        raise ValueError(f"{where} {len(incomplete)} incomplete or inconsistent group(s) (each needs {n_mix} rows "
                         f"with lam_index 0..{n_mix - 1} and one seed and pair): {'; '.join(detail)}")
    return table.reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# Helpers.

def _check_scale(s) -> float:
    if isinstance(s, (bool, np.bool_)):
        raise TypeError("s must be a number")
    s = float(s)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"the sigmoid scale s must be finite and positive, got {s}")
    return s


def _check_positive_int(x, name: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or x < 1:
        raise ValueError(f"{name} must be a positive integer, got {x!r}")
    return int(x)


def _l2_normalize(x: np.ndarray, what: str) -> np.ndarray:
    norm = np.sqrt((x * x).sum(axis=-1, keepdims=True))
    if (norm == 0).any():
        raise ValueError(f"cannot L2-normalise {what}: its norm is 0")
    return x / norm


def _check_manifest(manifest: pd.DataFrame, gen_dir) -> pd.DataFrame:
    absent = [c for c in PLAN_COLUMNS if c not in manifest.columns]
    if absent:
        raise ValueError(f"{gen_dir}/manifest.csv lacks columns {absent}")
    if not len(manifest):
        raise ValueError(f"{gen_dir}/manifest.csv is empty")
    dup = manifest["image_id"][manifest["image_id"].duplicated()]
    if len(dup):
        raise ValueError(f"{gen_dir}/manifest.csv has duplicate image ids {dup.tolist()[:5]}")
    return manifest[PLAN_COLUMNS].reset_index(drop=True)


def _check_prototypes(prototypes, manifest: pd.DataFrame, normalize: bool) -> np.ndarray:
    p = np.asarray(prototypes, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 2 or p.shape[1] < 1:
        raise ValueError(f"prototypes must be a (K, D) array with K >= 2, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("prototypes contain NaN or infinite values")
    K = p.shape[0]
    top = int(max(manifest["c1"].max(), manifest["c2"].max()))
    if top >= K or int(min(manifest["c1"].min(), manifest["c2"].min())) < 0:
        raise ValueError(f"the manifest names class {top}, but there are prototypes for {K} classes only")
    if normalize and (np.sqrt((p * p).sum(axis=1)) > 1 + 1e-6).any():
        raise ValueError("normalize=True but the prototypes have norms > 1: compute them with "
                         "class_prototypes(..., normalize=True)")
    pairs = manifest[["c1", "c2"]].drop_duplicates().to_numpy()
    project_lambda(np.zeros(p.shape[1]), p[pairs[:, 0]], p[pairs[:, 1]], classes=(pairs[:, 0], pairs[:, 1]))
    return np.ascontiguousarray(p)


def _embedder(encoder, encoder_info, batch_size, device, num_workers) -> tuple[Callable, dict]:
    if isinstance(encoder, (tuple, list)) and len(encoder) == 2:
        model, preprocess = encoder
        desc = {"kind": "open_clip", **dict(getattr(model, "semmix_encoder", {}) or {}),
                "parameters_sha256": _parameters_sha256(model), "preprocess": _describe_transform(preprocess)}
        desc.pop("weights", None)  # the file's location does not matter, its hash does
        if encoder_info:
            desc["info"] = encoder_info

        def embed_fn(paths):
            return encode_images(model, preprocess, ImageFiles(None, paths), batch_size=batch_size, device=device,
                                 num_workers=num_workers, progress=False)

        return embed_fn, desc
    if callable(encoder):
        name = getattr(encoder, "__qualname__", type(encoder).__name__)
        return encoder, {"kind": "callable", "name": name, "info": encoder_info}
    raise TypeError("encoder must be (model, preprocess) or a function embed_fn(paths) -> (n, D) array")


def _sha256_or_none(path: Path) -> str | None:
    return sha256_file(path) if path.exists() else None


def _prototypes_sha256(p: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(p, dtype=np.float64).tobytes()).hexdigest()


def _settings(gen_dir: Path, manifest: pd.DataFrame, enc_desc: dict, s: float, normalize: bool, chunk_size: int,
              prototypes: np.ndarray | None, extra) -> dict:
    n_mix = int((manifest["group"] == manifest["group"].iloc[0]).sum())
    return _jsonable({
        "format": _FORMAT,
        "method": "lam_clip = (f - p_c2).(p_c1 - p_c2) / ||p_c1 - p_c2||^2; soft_label = sigmoid(s (lam_clip - 0.5))",
        "encoder": enc_desc, "s": float(s), "normalize": bool(normalize), "chunk_size": int(chunk_size),
        "num_images": len(manifest), "n_mix": n_mix,
        "num_classes": None if prototypes is None else int(prototypes.shape[0]),
        "embed_dim": None if prototypes is None else int(prototypes.shape[1]),
        "manifest_sha256": _sha256_or_none(gen_dir / "manifest.csv"),
        "generation_sha256": _sha256_or_none(gen_dir / "generation.json"),
        "prototypes_sha256": None if prototypes is None else _prototypes_sha256(prototypes),
        "extra": extra,
    })


def _jsonable(obj):
    import json

    def default(x):
        if isinstance(x, (np.integer, np.floating, np.bool_)):
            return x.item()
        if isinstance(x, (np.ndarray, tuple, set)):
            return list(x.tolist() if isinstance(x, np.ndarray) else x)
        if isinstance(x, os.PathLike):
            return os.fspath(x)
        raise TypeError(f"cannot write {type(x).__name__} to JSON")

    return json.loads(json.dumps(obj, sort_keys=True, default=default))


def _read_settings(out_dir: Path) -> dict:
    path = Path(out_dir) / SETTINGS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {SETTINGS_FILE} in {out_dir}: not an annotation folder (see annotate)")
    return read_json(path)


def _check_settings(out_dir: Path, settings: dict, ignore=()) -> dict:
    old = _read_settings(out_dir)
    # The weights are identified by the hash of their tensors (encoder.parameters_sha256): the file's
    # own hash changes whenever the same weights are saved again (torch.save writes a random
    # serialization id), so it is recorded but not compared.
    diffs = settings_diff(old, settings, (*ignore, "encoder.weights_sha256"))
    if diffs:
        raise AnnotationMismatchError(
            f"{out_dir} holds an annotation made with other settings ({'; '.join(diffs)}). Use another folder, or "
            "delete this one to start afresh; annotations are never mixed.")
    return old


def _prepare_out(out_dir: Path, settings: dict, prototypes: np.ndarray, rank: int, sync: bool) -> None:
    """Check ``annotation.json`` (every rank), else write ``prototypes.npy`` then ``annotation.json`` (rank 0
    under torch.distributed, every call otherwise)."""
    if (out_dir / SETTINGS_FILE).exists():
        _check_settings(out_dir, settings)
    if not sync or rank == 0:
        if not (out_dir / SETTINGS_FILE).exists():
            if (out_dir / TABLE_FILE).exists() or (out_dir / EMBEDDINGS_DIR).exists():
                raise AnnotationMismatchError(f"{out_dir} holds annotations or embeddings but no {SETTINGS_FILE}; "
                                              "it was not written by annotate. Use an empty folder.")
            _save_npy(out_dir / PROTOTYPES_FILE, prototypes)
            write_json(out_dir / SETTINGS_FILE, settings)
        elif not (out_dir / PROTOTYPES_FILE).exists():
            _save_npy(out_dir / PROTOTYPES_FILE, prototypes)
    if sync:
        torch.distributed.barrier()
        if rank != 0:
            _check_settings(out_dir, settings)


def _load_prototypes(out_dir: Path, settings: dict) -> np.ndarray:
    path = Path(out_dir) / PROTOTYPES_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {PROTOTYPES_FILE} in {out_dir}")
    p = np.load(path, allow_pickle=False)
    if _prototypes_sha256(p) != settings["prototypes_sha256"]:
        raise AnnotationMismatchError(f"{path} is not the prototypes recorded in {SETTINGS_FILE} (hash differs)")
    return p


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)


def _chunk_path(out_dir: Path, i: int) -> Path:
    return Path(out_dir) / EMBEDDINGS_DIR / f"chunk_{i:05d}.npy"


# --------------------------------------------------------------------------------------------------
# Command line (single process or torchrun).

def main(argv=None) -> int:
    """``python -m semmix_lib.annotation --gen-dir DIR --out DIR --pretrained PATH_OR_TAG --dataset NAME [...]``.

    Prototypes come from the dataset's training split (``load_dataset(...).train_plain``; pass the split
    settings that training uses). Under torchrun (gloo on CPU, NCCL on CUDA) rank 0 computes them and
    broadcasts them; each rank embeds its chunks and rank 0 writes ``annotations.csv``. A re-run reuses the
    prototypes saved in ``--out`` and the chunks already there.
    """
    from .data import DATASETS, load_dataset

    p = argparse.ArgumentParser(prog="python -m semmix_lib.annotation", description=__doc__.splitlines()[0])
    p.add_argument("--gen-dir", required=True, help="generation folder (semmix_lib.mixing)")
    p.add_argument("--out", required=True, help="annotation folder")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture (default ViT-B-32)")
    p.add_argument("--pretrained", required=True, help="weights file (or folder), or an open_clip tag such as "
                   "'openai' (needs internet or open_clip's cache)")
    p.add_argument("--quick-gelu", choices=["auto", "on", "off"], default="auto",
                   help="QuickGELU activation (OpenAI's CLIP uses it); auto: from the weights' tag when known")
    p.add_argument("--allow-torchscript", action="store_true",
                   help="load a TorchScript weights file that is not an official OpenAI file (runs its code)")
    p.add_argument("--model-config", action="append", default=[],
                   help="extra open_clip model config (JSON file or folder) to register; repeatable")
    p.add_argument("--dataset", required=True, choices=DATASETS, help="the training set of the prototypes")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--test-fraction", type=float, default=None)
    p.add_argument("--noise-sigma", type=float, default=0.5, help="digits only")
    p.add_argument("--noise-seed", type=int, default=1234, help="digits only")
    p.add_argument("--s", type=float, default=None, help="sigmoid scale (default: the paper's for the dataset, "
                   f"{SOFT_LABEL_SCALE}, else {DEFAULT_SOFT_LABEL_SCALE})")
    p.add_argument("--normalize", action="store_true", help="L2-normalise embeddings (off in the paper)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import open_clip

    for cfg in args.model_config:
        if not os.path.exists(cfg):
            p.error(f"--model-config {cfg} not found")
        open_clip.add_model_config(cfg)
    with torchrun_session(args.device) as device:
        rank = torch.distributed.get_rank() if is_on() else 0
        quick_gelu = {"auto": None, "on": True, "off": False}[args.quick_gelu]
        model, preprocess = load_encoder(args.model, args.pretrained, device, quick_gelu=quick_gelu,
                                         allow_torchscript=args.allow_torchscript)
        splits = load_dataset(args.dataset, args.data_root, split_seed=args.split_seed, val_fraction=args.val_fraction,
                              test_fraction=args.test_fraction, noise_sigma=args.noise_sigma,
                              noise_seed=args.noise_seed, augment=False)
        s = soft_label_scale(args.dataset) if args.s is None else args.s
        gen_dir, out_dir = Path(args.gen_dir), Path(args.out)
        gen_settings = gen_dir / "generation.json"
        if gen_settings.exists():
            k = read_json(gen_settings).get("num_classes")
            if k is not None and int(k) != splits.num_classes:
                raise ValueError(f"{gen_dir} was generated for {k} classes, {args.dataset} has {splits.num_classes}")
        extra = {"prototypes": {"dataset": args.dataset, "split": "train_plain",
                                "dataset_fingerprint": splits.fingerprint}}
        prototypes = _saved_prototypes(out_dir, gen_dir, model, preprocess, s, args.normalize, args.chunk_size, extra)
        if prototypes is None:
            if rank == 0:
                prototypes = compute_prototypes(model, preprocess, splits, args.normalize, args.batch_size, device,
                                                args.num_workers, progress=not args.no_progress)
            if is_on():
                prototypes = _broadcast_prototypes(prototypes, splits.num_classes, model, device)
        table = annotate(gen_dir, out_dir, (model, preprocess), prototypes, s, normalize=args.normalize,
                         chunk_size=args.chunk_size, batch_size=args.batch_size, device=device,
                         num_workers=args.num_workers, progress=not args.no_progress, extra=extra)
        if table is not None:
            print(f"{len(table)} images annotated in {out_dir / TABLE_FILE} (s = {s}, lam_clip in "
                  f"[{table['lam_clip'].min():.3f}, {table['lam_clip'].max():.3f}])")
    return 0


def _saved_prototypes(out_dir: Path, gen_dir: Path, model, preprocess, s, normalize, chunk_size, extra):
    """The prototypes of an earlier run in ``out_dir`` if its settings (prototype hash aside) match these,
    so that a resumed run does not recompute them (GPU results may differ in the last bits)."""
    if not (out_dir / SETTINGS_FILE).exists():
        return None
    manifest = _check_manifest(read_manifest(gen_dir), gen_dir)
    _, desc = _embedder((model, preprocess), None, 1, None, 0)
    settings = _settings(gen_dir, manifest, desc, s, normalize, chunk_size, None, extra)
    old = _check_settings(out_dir, settings, ignore=("prototypes_sha256", "num_classes", "embed_dim"))
    if not (out_dir / PROTOTYPES_FILE).exists():
        return None
    return _load_prototypes(out_dir, old)


def _broadcast_prototypes(prototypes, num_classes: int, model, device) -> np.ndarray:
    dim = int(getattr(model.visual, "output_dim", 0)) or None
    if dim is None:
        raise ValueError("cannot tell the embedding size of the model to broadcast the prototypes")
    comm = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    buf = torch.empty((num_classes, dim), dtype=torch.float64, device=comm)
    if torch.distributed.get_rank() == 0:
        buf.copy_(torch.from_numpy(np.asarray(prototypes, dtype=np.float64)))
    torch.distributed.broadcast(buf, src=0)
    return buf.cpu().numpy()


if __name__ == "__main__":
    raise SystemExit(main())
