"""A small CLIP trained with open_clip on the digits, for offline annotation.

The paper re-annotates generated images with OpenAI's CLIP ViT-B/32 image embeddings. Those weights
cannot be downloaded on an offline machine, so the embedded study trains a tiny CLIP-style model
(:data:`DIGITS_CLIP`) with open_clip itself on the digits training split, saves it as a plain
open_clip state dict, and annotates through the very call the paper's weights take::

    open_clip.create_model_and_transforms(DIGITS_CLIP, pretrained="/path/to/digits_clip.pt")

Input normalisation. For a registered model name with a local ``pretrained`` *file*, open_clip's
factory gives the model its default :class:`open_clip.transform.PreprocessCfg`: OpenAI's mean/std
(:data:`open_clip.OPENAI_DATASET_MEAN` / ``_STD``), bicubic "shortest" resize to the model's
``image_size`` and a centre crop. A model config cannot carry a preprocess config (its keys go to
``CLIP(**cfg)``); only ``hf-hub:``/``local-dir:`` sources and registered pretrained *tags* do. So the
digits CLIP uses exactly that default eval transform -- the same normalisation as the paper's
ViT-B/32 -- for training and for annotation alike: training images are turned into 8-bit PIL images
and run through the model's own eval transform (resize 8 -> 8 and crop 8 are no-ops; see the tests).

Duplicate captions. With 10 classes most captions in a batch are identical. For open_clip's
:class:`~open_clip.ClipLoss` this is harmless: identical texts get identical logits, so the
image->text term equals a cross-entropy whose target is spread uniformly over the same-class texts,
and the text->image terms of identical texts sum to the multi-positive (uniform soft target) loss
over the same-class images. The gradients are those of the class-level contrastive loss; only the
loss value has a floor ``mean_i log n_class(i)`` (the number of same-class items in the batch)
instead of 0. We therefore encode the 10 captions once per step, index them by label, and report
the loss above that floor ("excess loss").
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from .io import read_json, save_checkpoint, write_json
from .progress import tqdm
from .runs import RunMismatchError

__all__ = [
    "DIGITS_CLIP", "DIGITS_CLIP_CONFIG", "DIGITS_CLIP_PARAMETERS", "DEFAULT_TEMPLATE",
    "register_model_configs", "captions", "zero_shot_classifier", "dataset_images",
    "encode_images", "zero_shot_accuracy", "prototype_separation", "train_clip",
    "load_digits_clip", "settings_path",
]

DIGITS_CLIP = "semmix-digits-vit"
DEFAULT_TEMPLATE = "a photo of the digit {}"

# open_clip model config (the JSON schema of open_clip/model_configs/*.json). Vision: ViT on 8x8
# images with 2x2 patches (16 patches + class token), 3 layers of width 64 (4 heads of 16). Text: the
# default BPE tokenizer (vocab 49408, so the token embedding dominates the parameter count; a text
# width of 16 keeps it at 790k), 2 layers, 16 tokens (a caption is 8 with start/end tokens).
DIGITS_CLIP_CONFIG: dict = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 8, "patch_size": 2, "width": 64, "layers": 3, "head_width": 16,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2,
                 "mlp_ratio": 2.0},
}
# Parameters of open_clip.create_model(DIGITS_CLIP): 106,688 in the image tower, 790,528 in the
# token embedding, the rest in the text transformer, projections and logit_scale.
DIGITS_CLIP_PARAMETERS = 902_977

_registry_dir: Path | None = None


def register_model_configs() -> None:
    """Register :data:`DIGITS_CLIP` with open_clip (idempotent; run at import of this module).

    open_clip's public way to add a model is :func:`open_clip.add_model_config`, which reads JSON
    files named ``<model name>.json``. We write :data:`DIGITS_CLIP_CONFIG` to such a file in a
    private temporary folder (removed when the process exits; open_clip keeps the parsed config).
    """
    global _registry_dir
    if open_clip.get_model_config(DIGITS_CLIP) == DIGITS_CLIP_CONFIG:
        return
    if _registry_dir is None:
        _registry_dir = Path(tempfile.mkdtemp(prefix="semmix-open-clip-configs-"))
        atexit.register(shutil.rmtree, _registry_dir, ignore_errors=True)
    path = _registry_dir / f"{DIGITS_CLIP}.json"
    path.write_text(json.dumps(DIGITS_CLIP_CONFIG, indent=2))
    open_clip.add_model_config(path)
    if open_clip.get_model_config(DIGITS_CLIP) != DIGITS_CLIP_CONFIG:
        raise RuntimeError(f"open_clip did not register {DIGITS_CLIP} from {path}")


register_model_configs()


# ----------------------------------------------------------------------------------------------
# Text side
# ----------------------------------------------------------------------------------------------


def captions(class_names: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One caption per class: ``template.format(name)``."""
    return [template.format(name) for name in class_names]


def _tokenizer_for(model):
    """open_clip's default BPE tokenizer with the model's context length."""
    return open_clip.SimpleTokenizer(context_length=int(getattr(model, "context_length", 77)))


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, class_names: Sequence[str],
                         templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> torch.Tensor:
    """(K, D) unit-norm class embeddings: per class, the mean of its normalised caption embeddings
    over ``templates`` (CLIP's prompt ensembling), normalised again. ``tokenizer=None`` uses the
    default BPE tokenizer at the model's context length."""
    tokenizer = tokenizer or _tokenizer_for(model)
    device = _device_of(model)
    rows = []
    for name in class_names:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------
# Image side
# ----------------------------------------------------------------------------------------------


def dataset_images(dataset, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,)
                   ) -> tuple[list[Image.Image], torch.Tensor]:
    """A dataset of ``Normalize(mean, std)``-ed CHW tensors as 8-bit PIL images (mode L or RGB) + labels.

    Pixels are ``round(clip((x * std + mean) * 255, 0, 255))``; for the digits (stored as 8-bit
    values) this gives back the stored pixels exactly.
    """
    from .annotation import TensorImages  # the same 8-bit round trip the annotation stage uses

    items = TensorImages(dataset, mean, std)
    images, labels = zip(*(items[i] for i in range(len(items)))) if len(items) else ((), ())
    return list(images), torch.tensor(labels, dtype=torch.long)


def _preprocessed(preprocess, images: Sequence[Image.Image]) -> torch.Tensor:
    return torch.stack([preprocess(im) for im in images])


@torch.no_grad()
def encode_images(model, preprocess, images: Sequence[Image.Image], batch_size: int = 512) -> torch.Tensor:
    """(N, D) unit-norm image embeddings of PIL images through ``preprocess`` and the image tower."""
    device = _device_of(model)
    out = [F.normalize(model.encode_image(_preprocessed(preprocess, images[i:i + batch_size]).to(device))
                       .float(), dim=-1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, 0)


def zero_shot_accuracy(model, preprocess, dataset, class_names: Sequence[str], *, tokenizer=None,
                       templates: Sequence[str] = (DEFAULT_TEMPLATE,), mean: Sequence[float] = (0.5,),
                       std: Sequence[float] = (0.5,)) -> float:
    """Accuracy of argmax cosine similarity between image and class-caption embeddings on ``dataset``
    (which yields ``Normalize(mean, std)``-ed tensors; they go through 8-bit PIL and ``preprocess``)."""
    images, labels = dataset_images(dataset, mean, std)
    classifier = zero_shot_classifier(model, tokenizer, class_names, templates).cpu()
    pred = (encode_images(model, preprocess, images) @ classifier.T).argmax(1)
    return float((pred == labels).float().mean())


def prototype_separation(model, preprocess, reference, evaluation, num_classes: int, *,
                         mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,)) -> dict:
    """How well the image embeddings alone separate the classes (what the annotation uses).

    Class prototypes are the normalised mean embeddings of ``reference`` (e.g. the training split).
    Returns the nearest-prototype accuracy on ``evaluation``, the mean cosine distance of its
    embeddings to their own class prototype, the mean cosine distance between distinct prototypes,
    and the smallest such distance.
    """
    ref_x, ref_y = dataset_images(reference, mean, std)
    ev_x, ev_y = dataset_images(evaluation, mean, std)
    ref, ev = encode_images(model, preprocess, ref_x), encode_images(model, preprocess, ev_x)
    protos = F.normalize(torch.stack([ref[ref_y == k].mean(0) for k in range(num_classes)]), dim=-1)
    sims = ev @ protos.T
    between = 1 - protos @ protos.T
    off = ~torch.eye(num_classes, dtype=torch.bool)
    return {
        "nearest_prototype_accuracy": float((sims.argmax(1) == ev_y).float().mean()),
        "within_class_distance": float((1 - sims.gather(1, ev_y[:, None])).mean()),
        "between_prototype_distance": float(between[off].mean()),
        "min_between_prototype_distance": float(between[off].min()),
    }


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_digits_clip(path, device: str | torch.device = "cpu"):
    """``open_clip.create_model_and_transforms(DIGITS_CLIP, pretrained=str(path))``: (model in eval
    mode, eval preprocess) -- the loading path the paper's pretrained weights take."""
    register_model_configs()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no digits CLIP checkpoint at {path}; train one with train_clip")
    model, _, preprocess = open_clip.create_model_and_transforms(DIGITS_CLIP, pretrained=str(path),
                                                                 device=device)
    return model.eval(), preprocess


class _DropRandomInitWarning(logging.Filter):
    """Hide open_clip's "initialized randomly" warning while we build a model on purpose to train it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _new_model(device):
    root, quiet = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(DIGITS_CLIP, device=device)
    finally:
        root.removeFilter(quiet)
    return model, preprocess


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def settings_path(out_path) -> Path:
    """The JSON written next to a checkpoint: ``digits_clip.pt`` -> ``digits_clip.json``."""
    out_path = Path(out_path)
    if out_path.suffix == ".json":
        raise ValueError(f"the checkpoint path must not end in .json: {out_path}")
    return out_path.with_suffix(".json")


def _lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0 (open_clip's ``cosine_lr``)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * lr


def _param_groups(model, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, norms and logit_scale."""
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


def _loss_floor(labels: torch.Tensor) -> float:
    """Smallest ClipLoss of a batch whose captions repeat per class: ``mean_i log n_class(i)``."""
    counts = torch.bincount(labels)
    return float(torch.log(counts[labels].double()).mean())


def train_clip(splits, out_path, epochs: int = 20, batch_size: int = 32, lr: float = 2e-3,
               weight_decay: float = 0.1, warmup_steps: int = 50, template: str = DEFAULT_TEMPLATE,
               seed: int = 0, device: str | torch.device = "cpu", progress: bool = True):
    """Train :data:`DIGITS_CLIP` contrastively on (image, caption of its class) pairs; returns
    ``load_digits_clip(out_path)``, i.e. (model, eval preprocess).

    Data: ``splits.train_plain`` (tensors normalised with ``splits.mean/std``) turned into 8-bit PIL
    images and run once through the model's own eval transform, so training sees exactly what the
    annotation will. Loss: open_clip's ``ClipLoss`` with the learnable ``logit_scale`` (init
    1/0.07, clamped to <= 100 after each step as in open_clip's training). AdamW (betas 0.9/0.98,
    eps 1e-6, open_clip's weight-decay groups), linear warm-up then cosine decay, per-epoch
    shuffles from ``seed``.

    Writes ``out_path`` (a plain open_clip state dict, atomically, loadable with
    ``torch.load(weights_only=True)``) and :func:`settings_path` (settings, test/val zero-shot
    accuracy, prototype separation, loss history). If ``out_path`` exists and its JSON holds the same
    settings it is loaded instead of retrained; any other file there raises
    :class:`~semmix_lib.runs.RunMismatchError` (never silently overwritten).
    """
    register_model_configs()
    out_path, meta_path = Path(out_path), settings_path(out_path)
    settings = json.loads(json.dumps({
        "model": DIGITS_CLIP, "model_cfg": DIGITS_CLIP_CONFIG, "epochs": int(epochs),
        "batch_size": int(batch_size), "lr": float(lr), "weight_decay": float(weight_decay),
        "warmup_steps": int(warmup_steps), "betas": [0.9, 0.98], "eps": 1e-6,
        "template": template, "seed": int(seed), "data": splits.fingerprint,
        "class_names": list(splits.class_names),
    }))
    if out_path.exists():
        old = read_json(meta_path).get("settings") if meta_path.exists() else None
        if old == settings:
            return load_digits_clip(out_path, device)
        diff = ("no settings file " + str(meta_path)) if old is None else "differs in: " + ", ".join(
            sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k)))
        raise RunMismatchError(f"{out_path} holds a CLIP trained with other settings ({diff}); "
                               "use another path or delete it to retrain")
    meta_path.unlink(missing_ok=True)  # a stale JSON without its checkpoint

    device = torch.device(device)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model, preprocess = _new_model(device)
    model.train()
    tokenizer = open_clip.get_tokenizer(DIGITS_CLIP)
    texts = tokenizer(captions(splits.class_names, template)).to(device)
    images, labels = dataset_images(splits.train_plain, splits.mean, splits.std)
    x_all, y_all = _preprocessed(preprocess, images).to(device), labels.to(device)

    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x_all) / batch_size)
    total, step, history = epochs * steps_per_epoch, 0, []
    bar = tqdm(range(epochs), desc="CLIP training", disable=not progress)
    for epoch in bar:
        order = torch.randperm(len(x_all), generator=gen).to(device)
        sums = np.zeros(2)
        for i in range(0, len(x_all), batch_size):
            idx = order[i:i + batch_size]
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, lr, warmup_steps)
            image_features = model.encode_image(x_all[idx], normalize=True)
            # the K captions once, then one row per image (duplicates: see the module docstring)
            text_features = model.encode_text(texts, normalize=True)[y_all[idx]]
            loss = loss_fn(image_features, text_features, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            sums += (loss.item() * len(idx), (loss.item() - _loss_floor(y_all[idx].cpu())) * len(idx))
        history.append({"epoch": epoch + 1, "loss": sums[0] / len(x_all), "excess_loss": sums[1] / len(x_all),
                        "logit_scale": float(model.logit_scale.detach().exp())})
        bar.set_postfix(excess_loss=f"{history[-1]['excess_loss']:.3f}", refresh=False)
    bar.close()
    train_seconds = time.perf_counter() - start

    save_checkpoint(out_path, {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    loaded, loaded_preprocess = load_digits_clip(out_path, device)
    if loaded.visual.preprocess_cfg != model.visual.preprocess_cfg:  # same factory path: cannot differ
        raise RuntimeError("the loaded model's preprocessing differs from the one used in training")
    kwargs = dict(mean=splits.mean, std=splits.std)
    results = {
        "zero_shot_test_accuracy": zero_shot_accuracy(loaded, loaded_preprocess, splits.test,
                                                      splits.class_names, templates=(template,), **kwargs),
        "zero_shot_val_accuracy": zero_shot_accuracy(loaded, loaded_preprocess, splits.val,
                                                     splits.class_names, templates=(template,), **kwargs),
        "prototypes_train_to_test": prototype_separation(loaded, loaded_preprocess, splits.train_plain,
                                                         splits.test, len(splits.class_names), **kwargs),
        "train_seconds": train_seconds, "steps": total,
        "parameters": sum(p.numel() for p in loaded.parameters()),
        "history": history,
    }
    write_json(meta_path, {"settings": settings, "results": results,
                           "preprocess_cfg": loaded.visual.preprocess_cfg,
                           "open_clip_version": open_clip.__version__,
                           "torch_version": torch.__version__})
    return loaded, loaded_preprocess
