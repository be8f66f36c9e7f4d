"""Tests for semmix_lib.annotation: projection, soft labels, prototypes, sharded/resumable annotation of a
generation folder, the hand-over table, and loading open_clip encoders from local weights files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from semmix_lib import annotation as A
from semmix_lib.annotation import (
    ANNOTATION_COLUMNS,
    SOFT_LABEL_SCALE,
    AnnotationMismatchError,
    ImageFiles,
    TensorImages,
    annotate,
    assemble_annotations,
    class_prototypes,
    encode_images,
    load_encoder,
    project_lambda,
    read_annotations,
    soft_label,
    soft_label_scale,
    soft_targets,
)
from semmix_lib.io import sha256_file
from semmix_lib.mixing import group_plan

open_clip = pytest.importorskip("open_clip")

TINY = "semmix-test-tiny"
TINY_CFG = {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    """Register a tiny open_clip architecture (a 1-layer ViT on 32 px) for fast encoder tests."""
    folder = tmp_path_factory.mktemp("open_clip_cfg")
    path = folder / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CFG))
    big = dict(TINY_CFG, vision_cfg=dict(TINY_CFG["vision_cfg"], width=48))
    (folder / f"{TINY}-wide.json").write_text(json.dumps(big))
    open_clip.add_model_config(folder)
    return path


def tiny_model(seed: int = 0, name: str = TINY):
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None).eval()


@pytest.fixture(scope="session")
def tiny_weights(tiny_config, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_weights") / "tiny.pt"
    torch.save(tiny_model().state_dict(), path)
    return path


# ----------------------------------------------------------------------------------------------
# A hand-made generation folder: 4x4 grey PNGs whose left half is L and right half R.
# ----------------------------------------------------------------------------------------------

SEEDS = [1, 10, 2, 11]  # ids 1_0_1_* and 10_0_2_*, 11_0_1_*: prefix look-alikes; with n_mix 11, 1_0_1_1 / 1_0_1_10
K, N_MIX = 3, 11
PROTOS = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])


def halves(seed: int, j: int) -> tuple[int, int]:
    return 4 * j + seed, 200 - 3 * j - seed


def make_gen_folder(root: Path, seeds=SEEDS, num_classes=K, n_mix=N_MIX, size=4) -> pd.DataFrame:
    plan = group_plan(seeds, num_classes, n_mix)
    root.mkdir(parents=True, exist_ok=True)
    plan.to_csv(root / "manifest.csv", index=False)
    for row in plan.itertuples():
        left, right = halves(row.seed, row.lam_index)
        img = np.empty((size, size), dtype=np.uint8)
        img[:, : size // 2], img[:, size // 2:] = left, right
        (root / row.path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / row.path)
    return plan


class HalfMeans:
    """Fake encoder: embedding = (mean of the left half, mean of the right half); records its calls."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, paths):
        self.calls.append([Path(p).name for p in paths])
        out = []
        for p in paths:
            with Image.open(p) as img:
                a = np.asarray(img, dtype=np.float64)
            w = a.shape[1] // 2
            out.append([a[:, :w].mean(), a[:, w:].mean()])
        return np.array(out, dtype=np.float32)


def expected_lam(row) -> float:
    """lam_clip for PROTOS, derived by hand: p0 = (0, 0), p1 = (100, 0), p2 = (0, 100)."""
    left, right = halves(row.seed, row.lam_index)
    if (row.c1, row.c2) == (0, 1):
        return (100 - left) / 100
    if (row.c1, row.c2) == (0, 2):
        return (100 - right) / 100
    return (left - right + 100) / 200  # (1, 2)


def run(gen, out, embed=None, **kw):
    kw = dict(chunk_size=5, progress=False) | kw
    return annotate(gen, out, embed or HalfMeans(), kw.pop("prototypes", PROTOS), kw.pop("s", 4.0), **kw)


@pytest.fixture
def gen(tmp_path) -> Path:
    make_gen_folder(tmp_path / "gen")
    return tmp_path / "gen"


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------

def test_project_lambda_by_hand():
    p1, p2 = np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, -1.0])  # d = p1 - p2 = (-2, 0, 4)
    mid = (p1 + p2) / 2
    orth = np.array([2.0, 7.0, 1.0])  # orth . d = 0
    assert project_lambda(p1, p1, p2) == pytest.approx(1.0, abs=1e-15)
    assert project_lambda(p2, p1, p2) == pytest.approx(0.0, abs=1e-15)
    assert project_lambda(mid, p1, p2) == pytest.approx(0.5, abs=1e-15)
    assert project_lambda(p1 + 0.5 * (p1 - p2), p1, p2) == pytest.approx(1.5)  # beyond p_c1: > 1
    assert project_lambda(p2 - (p1 - p2), p1, p2) == pytest.approx(-1.0)  # beyond p_c2: < 0
    assert project_lambda(mid + 3 * orth, p1, p2) == pytest.approx(0.5, abs=1e-15)  # a projection
    # rows, with shared or per-row prototypes
    f = np.stack([p1, p2, mid, mid + orth, p1 + (p1 - p2)])
    out = project_lambda(f, p1, p2)
    assert out.shape == (5,) and out.dtype == np.float64
    np.testing.assert_allclose(out, [1, 0, 0.5, 0.5, 2], atol=1e-14)
    q1 = np.stack([p1, p2, p1, p1, p1])
    q2 = np.stack([p2, p1, p2, p2, p2])  # row 1 swaps the roles: p2 is now "c1"
    np.testing.assert_allclose(project_lambda(f, q1, q2), [1, 1, 0.5, 0.5, 2], atol=1e-14)


def test_project_lambda_coinciding_prototypes_raise():
    p = np.array([1.0, 2.0])
    with pytest.raises(ValueError, match="coincide"):
        project_lambda(np.zeros(2), p, p.copy())
    p1 = np.array([[0.0, 0.0], [5.0, 5.0]])
    p2 = np.array([[1.0, 0.0], [5.0, 5.0 + 1e-9]])
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        project_lambda(np.zeros((2, 2)), p1, p2, classes=(np.array([0, 3]), np.array([1, 4])))


def test_soft_label_values():
    assert soft_label(0.5, 4.0) == 0.5
    assert soft_label(1.0, 4.0) == pytest.approx(1 / (1 + math.exp(-2)), rel=1e-15)  # sigmoid(2)
    assert soft_label(0.0, 2.3) == pytest.approx(1 / (1 + math.exp(1.15)), rel=1e-15)
    grid = np.linspace(-3, 4, 301)
    values = soft_label(grid, 4.0)
    assert np.all(np.diff(values) > 0) and np.all((values > 0) & (values < 1))
    np.testing.assert_allclose(soft_label(0.5 + grid, 2.3) + soft_label(0.5 - grid, 2.3), 1.0, atol=1e-15)
    assert SOFT_LABEL_SCALE == {"cifar10": 4.0, "cifar100": 2.3, "tiny-imagenet": 4.0}
    assert soft_label_scale("cifar100") == 2.3 and soft_label_scale("digits") == 4.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            soft_label(0.3, bad)


def test_class_prototypes_by_hand():
    emb = np.array([[1, 0], [3, 0], [0, 2], [0, 4], [5, 5], [3, 4], [0, 2]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 2, 3, 3])
    np.testing.assert_allclose(class_prototypes(emb, labels, 4), [[2, 0], [0, 3], [5, 5], [1.5, 3]], atol=0)
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(class_prototypes(emb, labels, 4, normalize=True),
                               [[1, 0], [0, 1], [r, r], [0.3, 0.9]], atol=1e-15)  # (0.6, 0.8) and (0, 1)
    # the order of the rows does not matter
    perm = np.array([6, 2, 4, 0, 5, 3, 1])
    assert np.array_equal(class_prototypes(emb[perm], labels[perm], 4), class_prototypes(emb, labels, 4))


def test_class_prototypes_errors():
    emb = np.ones((3, 2))
    with pytest.raises(ValueError, match=r"\[1\]"):
        class_prototypes(emb, np.array([0, 0, 2]), 3)  # class 1 has no images
    with pytest.raises(ValueError, match="outside"):
        class_prototypes(emb, np.array([0, 1, 3]), 3)
    with pytest.raises(ValueError, match="one label per"):
        class_prototypes(emb, np.array([0, 1]), 2)


# ----------------------------------------------------------------------------------------------
# Annotating a generation folder
# ----------------------------------------------------------------------------------------------

def test_annotate_labels_every_image_by_hand(gen, tmp_path):
    embed = HalfMeans()
    table = run(gen, tmp_path / "ann", embed)
    assert list(table.columns) == ANNOTATION_COLUMNS and len(table) == len(SEEDS) * N_MIX
    by_id = table.set_index("image_id")
    hand = {"1_0_1_1": 0.95, "1_0_1_10": 0.59, "10_0_2_0": -0.9, "2_1_2_3": -0.375, "11_0_1_10": 0.49}
    for image_id, lam in hand.items():
        assert by_id.loc[image_id, "lam_clip"] == pytest.approx(lam, abs=1e-12), image_id
        assert by_id.loc[image_id, "soft_label"] == pytest.approx(1 / (1 + math.exp(-4 * (lam - 0.5))), abs=1e-12)
    # every image its own label (not the group's last one, not a prefix look-alike's)
    expect = np.array([expected_lam(r) for r in table.itertuples()])
    np.testing.assert_allclose(table["lam_clip"], expect, atol=1e-12)
    assert (table.groupby("group")["lam_clip"].nunique() == N_MIX).all()
    # the rows are the manifest's, in order; chunk files hold the raw embeddings
    manifest = pd.read_csv(gen / "manifest.csv", dtype={"image_id": str, "path": str})
    assert table["image_id"].tolist() == manifest["image_id"].tolist()
    assert table["path"].tolist() == manifest["path"].tolist()
    chunks = sorted((tmp_path / "ann" / "embeddings").glob("chunk_*.npy"))
    assert [c.name for c in chunks] == [f"chunk_{i:05d}.npy" for i in range(9)]  # 44 images, 5 per chunk
    first = np.load(chunks[0])
    assert first.dtype == np.float32 and first.shape == (5, 2)
    assert first[1].tolist() == list(halves(1, 1))
    assert len(embed.calls) == 9 and embed.calls[-1] == [Path(p).name for p in manifest["path"][40:]]
    # what was written is what read_annotations hands over, exactly
    pd.testing.assert_frame_equal(read_annotations(tmp_path / "ann", gen), table)
    settings = json.loads((tmp_path / "ann" / "annotation.json").read_text())
    assert settings["s"] == 4.0 and settings["chunk_size"] == 5 and settings["num_images"] == 44
    assert settings["normalize"] is False and settings["n_mix"] == N_MIX and settings["num_classes"] == K
    assert np.array_equal(np.load(tmp_path / "ann" / "prototypes.npy"), PROTOS)


def test_annotate_normalize_uses_unit_embeddings(gen, tmp_path):
    protos = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    table = run(gen, tmp_path / "ann", prototypes=protos, normalize=True)
    row = table.set_index("image_id").loc["1_0_1_1"]  # f = (5, 196) / |.|, pair (0, 1)
    f = np.array([5.0, 196.0]) / math.hypot(5, 196)
    assert row["lam_clip"] == pytest.approx((f - protos[1]) @ (protos[0] - protos[1]) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="normalize=True"):
        run(gen, tmp_path / "other", prototypes=PROTOS, normalize=True)


def test_two_ranks_equal_one_rank(gen, tmp_path):
    one = run(gen, tmp_path / "one")
    r0, r1 = HalfMeans(), HalfMeans()
    assert run(gen, tmp_path / "two", r0, rank=0, world_size=2) is None  # rank 1's chunks are missing
    assert not (tmp_path / "two" / "annotations.csv").exists()
    assert run(gen, tmp_path / "two", r1, rank=1, world_size=2) is None  # only rank 0 assembles
    assert len(r0.calls) == 5 and len(r1.calls) == 4  # chunks 0, 2, 4, 6, 8 and 1, 3, 5, 7
    assert r1.calls[0][0] == Path(one["path"].iloc[5]).name
    two = assemble_annotations(tmp_path / "two", gen)
    pd.testing.assert_frame_equal(two, one)
    assert (tmp_path / "two" / "annotations.csv").read_bytes() == (tmp_path / "one" / "annotations.csv").read_bytes()
    # rank 0 called again once everything is there: assembles, embeds nothing
    again = HalfMeans()
    pd.testing.assert_frame_equal(run(gen, tmp_path / "two", again, rank=0, world_size=2), one)
    assert again.calls == []


def test_resume_recomputes_only_the_missing_chunk(gen, tmp_path):
    out = tmp_path / "ann"
    first = run(gen, out)
    before = {p.name: p.read_bytes() for p in (out / "embeddings").iterdir()}
    (out / "embeddings" / "chunk_00003.npy").unlink()
    (out / "annotations.csv").unlink()
    embed = HalfMeans()
    again = run(gen, out, embed)
    assert len(embed.calls) == 1
    assert embed.calls[0] == [Path(p).name for p in first["path"][15:20]]
    pd.testing.assert_frame_equal(again, first)
    assert {p.name: p.read_bytes() for p in (out / "embeddings").iterdir()} == before


def test_other_settings_are_refused(gen, tmp_path):
    out = tmp_path / "ann"
    run(gen, out)
    embed = HalfMeans()
    with pytest.raises(AnnotationMismatchError, match=r"s: 4\.0 \(folder\) vs 2\.3 \(now\)"):
        run(gen, out, embed, s=2.3)
    with pytest.raises(AnnotationMismatchError, match="chunk_size"):
        run(gen, out, embed, chunk_size=6)
    with pytest.raises(AnnotationMismatchError, match="prototypes_sha256"):
        run(gen, out, embed, prototypes=PROTOS + [[0, 1], [0, 0], [0, 0]])
    with pytest.raises(AnnotationMismatchError, match="encoder"):
        run(gen, out, lambda paths: np.zeros((len(paths), 2)))
    assert embed.calls == []
    # a folder with embeddings but no annotation.json is not ours
    (tmp_path / "foreign" / "embeddings").mkdir(parents=True)
    with pytest.raises(AnnotationMismatchError, match="not written by annotate"):
        run(gen, tmp_path / "foreign")


def test_manifest_image_mismatch_is_named(gen, tmp_path):
    plan = pd.read_csv(gen / "manifest.csv", dtype={"image_id": str, "path": str})
    missing = plan["path"].iloc[7]
    (gen / missing).unlink()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(gen / "images" / "000-001" / "99_0_1_0.5000.png")
    embed = HalfMeans()
    with pytest.raises(ValueError) as err:
        run(gen, tmp_path / "ann", embed)
    assert missing in str(err.value) and "images/000-001/99_0_1_0.5000.png" in str(err.value)
    assert embed.calls == [] and not (tmp_path / "ann").exists()


def _edit_table(out: Path, edit) -> None:
    table = pd.read_csv(out / "annotations.csv", dtype={"image_id": str, "path": str})
    edit(table).to_csv(out / "annotations.csv", index=False)


def test_read_annotations_catches_broken_tables(gen, tmp_path):
    out = tmp_path / "ann"
    good = run(gen, out)
    text = (out / "annotations.csv").read_text()

    _edit_table(out, lambda t: t[t["image_id"] != "1_0_1_10"])  # an image without a label
    with pytest.raises(ValueError, match="1 missing, e.g. 1_0_1_10"):
        read_annotations(out, gen)
    with pytest.raises(ValueError, match=r"group 0: 10 rows"):  # without the manifest: an incomplete group
        read_annotations(out)

    (out / "annotations.csv").write_text(text)
    _edit_table(out, lambda t: t.assign(lam_clip=t["lam_clip"].where(t["image_id"] != "2_1_2_3")))
    with pytest.raises(ValueError, match=r"NaN.*lam_clip.*2_1_2_3"):
        read_annotations(out)

    (out / "annotations.csv").write_text(text)
    _edit_table(out, lambda t: t.assign(image_id=t["image_id"].replace("10_0_2_4", "10_0_2_40")))
    with pytest.raises(ValueError, match=r"missing, e\.g\. 10_0_2_4;.*not in the manifest, e\.g\. 10_0_2_40"):
        read_annotations(out, gen)

    (out / "annotations.csv").write_text(text)
    _edit_table(out, lambda t: t.assign(soft_label=np.where(t["image_id"] == "11_0_1_3", 0.5, t["soft_label"])))
    with pytest.raises(ValueError, match="11_0_1_3"):
        read_annotations(out)

    (out / "annotations.csv").write_text(text)
    _edit_table(out, lambda t: t.assign(lam_index=np.where(t["image_id"] == "1_0_1_2", 3, t["lam_index"]),
                                        lam=np.where(t["image_id"] == "1_0_1_2", 0.3, t["lam"])))
    with pytest.raises(ValueError, match="group 0"):  # two rows with lam_index 3, none with 2
        read_annotations(out)

    (out / "annotations.csv").write_text(text)
    pd.testing.assert_frame_equal(read_annotations(out, gen), good)


def test_soft_targets(gen, tmp_path):
    table = run(gen, tmp_path / "ann")
    t = soft_targets(table, K)
    assert t.shape == (len(table), K)
    rows = np.arange(len(table))
    np.testing.assert_array_equal(t[rows, table["c1"]], table["soft_label"])
    np.testing.assert_array_equal(t[rows, table["c2"]], 1 - table["soft_label"])
    np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-15)
    assert ((t > 0).sum(axis=1) == 2).all()
    with pytest.raises(ValueError, match="outside"):
        soft_targets(table, 2)


# ----------------------------------------------------------------------------------------------
# Images for the encoder
# ----------------------------------------------------------------------------------------------

def test_tensor_images_recover_the_8bit_pixels():
    from torchvision import transforms as T

    from semmix_lib.data import ArrayDataset, load_dataset

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # CIFAR's
    ds = ArrayDataset(rgb, [0, 1, 2, 3, 4], T.Compose([T.ToTensor(), T.Normalize(mean, std)]))
    images = TensorImages(ds, mean, std)
    for i in range(5):
        pil, y = images[i]
        assert pil.mode == "RGB" and y == i and np.array_equal(np.asarray(pil), rgb[i])
    digits = load_dataset("digits")
    images = TensorImages(digits.train_plain, digits.mean, digits.std)
    x, y = digits.train_plain[3]
    pil, y2 = images[3]
    assert pil.mode == "L" and pil.size == (8, 8) and y2 == y
    assert np.array_equal(np.asarray(pil), np.rint((x[0].numpy().astype(np.float64) + 1) * 127.5).astype(np.uint8))
    assert images.targets == list(digits.train_plain.targets)


def _pngs(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i, shape in enumerate([(9, 9), (12, 10, 3), (5, 5)]):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(paths[-1])
    return paths


def test_encode_images_equals_direct_encoding(tiny_config, tmp_path):
    model = tiny_model()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    paths = _pngs(tmp_path)
    pils = [Image.open(p) for p in paths]
    with torch.no_grad():
        direct = model.encode_image(torch.stack([preprocess(p) for p in pils])).numpy()
    for source in (paths, [str(p) for p in paths], ImageFiles(tmp_path, [p.name for p in paths]), pils):
        emb = encode_images(model, preprocess, source, batch_size=2, progress=False)
        assert emb.shape == (3, 16) and emb.dtype == np.float32
        np.testing.assert_allclose(emb, direct, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="training mode"):
        encode_images(model.train(), preprocess, paths, progress=False)


# ----------------------------------------------------------------------------------------------
# Loading open_clip weights
# ----------------------------------------------------------------------------------------------

def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def test_load_encoder_reads_state_dict_formats(tiny_config, tmp_path):
    from safetensors.torch import save_file

    ref = tiny_model(seed=3)
    sd = ref.state_dict()
    files = {"plain.pt": lambda p: torch.save(sd, p),
             "wrapped.pth": lambda p: torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()},
                                                  "epoch": 3}, p),
             "weights.safetensors": lambda p: save_file({k: v.contiguous() for k, v in sd.items()}, str(p))}
    for name, write in files.items():
        write(tmp_path / name)
        model, preprocess = load_encoder(TINY, tmp_path / name)
        assert not model.training and _same_weights(model, ref), name
        info = model.semmix_encoder
        assert info["weights_sha256"] == sha256_file(tmp_path / name) and info["quick_gelu"] is False
        assert preprocess(Image.new("L", (9, 9))).shape == (3, 32, 32)
    # a folder holding open_clip_pytorch_model.bin
    (tmp_path / "hf").mkdir()
    torch.save(sd, tmp_path / "hf" / "open_clip_pytorch_model.bin")
    assert _same_weights(load_encoder(TINY, tmp_path / "hf")[0], ref)
    # QuickGELU on request (OpenAI's activation)
    model, _ = load_encoder(TINY, tmp_path / "plain.pt", quick_gelu=True)
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    model, _ = load_encoder(TINY, tmp_path / "plain.pt")
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"


def test_load_encoder_errors(tiny_config, tiny_weights, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_encoder(TINY, tmp_path / "nowhere" / "ViT-B-32.pt")
    for hint in ("not found", "ViT-B-32.pt", "open_clip_pytorch_model.bin", "pass the file's path"):
        assert hint in str(err.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_encoder(TINY, "not-a-tag")
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-B-23'.*ViT-B-32"):
        load_encoder("ViT-B-23", None)
    # another architecture's weights: the mismatched keys are named
    torch.manual_seed(0)
    wide = tmp_path / "wide.pt"
    torch.save(open_clip.create_model(f"{TINY}-wide").state_dict(), wide)
    with pytest.raises(ValueError, match=rf"not hold weights for open_clip model {TINY}.*shape mismatch.*visual\."):
        load_encoder(TINY, wide)
    # a truncated file
    data = tiny_weights.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_encoder(TINY, tmp_path / "cut.pt")
    # a pickle that needs code (a whole module) is refused, not unpickled
    torch.save(tiny_model(), tmp_path / "module.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_encoder(TINY, tmp_path / "module.pt")


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_archives_need_a_known_hash_or_consent(tiny_config, tmp_path, monkeypatch):
    ref = tiny_model(seed=5)
    traced = torch.jit.trace(ref, (torch.zeros(1, 3, 32, 32), torch.zeros(1, 8, dtype=torch.long)),
                             check_trace=False)
    path = tmp_path / "openai-like.pt"
    traced.save(str(path))
    with pytest.raises(ValueError, match="TorchScript archive"):
        load_encoder(TINY, path)
    assert _same_weights(load_encoder(TINY, path, allow_torchscript=True)[0], ref)  # extra attn_mask dropped
    sha = sha256_file(path)
    monkeypatch.setattr(A, "_official_sha256", lambda: {sha: (TINY, "openai")})
    model, _ = load_encoder(TINY, path)  # an official file (by hash) is trusted
    assert _same_weights(model, ref) and model.semmix_encoder["identified_as"] == f"{TINY}/openai"
    monkeypatch.setattr(A, "_official_sha256", lambda: {sha: ("RN50", "openai")})
    with pytest.raises(ValueError, match="official RN50 / openai checkpoint"):
        load_encoder(TINY, path)


def test_annotate_with_an_open_clip_encoder(tiny_weights, tmp_path):
    gen = tmp_path / "gen"
    plan = make_gen_folder(gen, seeds=[0, 1, 2], n_mix=3, size=8)
    model, preprocess = load_encoder(TINY, tiny_weights)
    paths = [gen / p for p in plan["path"]]
    emb = encode_images(model, preprocess, paths, progress=False)
    protos = class_prototypes(emb, plan["lam_index"].to_numpy(), 3)  # any three distinct points will do
    table = annotate(gen, tmp_path / "ann", (model, preprocess), protos, 2.3, chunk_size=4, batch_size=3,
                     progress=False)
    c1, c2 = plan["c1"].to_numpy(), plan["c2"].to_numpy()
    np.testing.assert_allclose(table["lam_clip"], project_lambda(emb, protos[c1], protos[c2]), rtol=1e-5, atol=1e-5)
    enc = json.loads((tmp_path / "ann" / "annotation.json").read_text())["encoder"]
    assert enc["model"] == TINY and enc["weights_sha256"] == sha256_file(tiny_weights)
    assert "weights" not in enc and len(enc["parameters_sha256"]) == 64
    other, _ = load_encoder(TINY, tiny_weights, quick_gelu=True)
    with pytest.raises(AnnotationMismatchError, match="quick_gelu"):
        annotate(gen, tmp_path / "ann", (other, preprocess), protos, 2.3, chunk_size=4, progress=False)


def _cli_args(gen, out, weights, config, *more):
    return ["--gen-dir", str(gen), "--out", str(out), "--model", TINY, "--model-config", str(config),
            "--pretrained", str(weights), "--dataset", "digits", "--chunk-size", "4", "--batch-size", "64",
            "--device", "cpu", "--no-progress", *more]


def test_main_cli_on_digits(tiny_config, tiny_weights, tmp_path, monkeypatch, capsys):
    from semmix_lib.data import load_dataset

    gen, out = tmp_path / "gen", tmp_path / "ann"
    plan = make_gen_folder(gen, seeds=[0, 1, 2], num_classes=10, n_mix=3, size=8)
    assert A.main(_cli_args(gen, out, tiny_weights, tiny_config)) == 0
    assert "9 images annotated" in capsys.readouterr().out
    table = read_annotations(out, gen)
    model, preprocess = load_encoder(TINY, tiny_weights)
    protos = A.compute_prototypes(model, preprocess, load_dataset("digits"), batch_size=64, progress=False)
    np.testing.assert_array_equal(np.load(out / "prototypes.npy"), protos)
    emb = encode_images(model, preprocess, [gen / p for p in plan["path"]], progress=False)
    lam = project_lambda(emb, protos[plan["c1"]], protos[plan["c2"]])
    np.testing.assert_allclose(table["lam_clip"], lam, rtol=1e-5, atol=1e-5)
    settings = json.loads((out / "annotation.json").read_text())
    assert settings["s"] == 4.0 and settings["extra"]["prototypes"]["dataset"] == "digits"
    # a re-run reuses the saved prototypes and chunks
    monkeypatch.setattr(A, "compute_prototypes", lambda *a, **k: pytest.fail("prototypes recomputed"))
    stamp = {p: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()}
    assert A.main(_cli_args(gen, out, tiny_weights, tiny_config)) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()} == stamp
    with pytest.raises(AnnotationMismatchError, match="s: 4.0"):
        A.main(_cli_args(gen, out, tiny_weights, tiny_config, "--s", "2.3"))


@pytest.mark.slow
def test_main_under_torchrun_matches_one_process(tiny_config, tiny_weights, tmp_path):
    gen = tmp_path / "gen"
    make_gen_folder(gen, seeds=[0, 1, 2, 3], num_classes=10, n_mix=3, size=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    for n in (1, 2):
        args = _cli_args(gen, tmp_path / f"n{n}", tiny_weights, tiny_config)
        proc = subprocess.run([*base, f"--nproc_per_node={n}", "-m", "semmix_lib.annotation", *args],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "n1" / "annotations.csv").read_bytes() == (tmp_path / "n2" / "annotations.csv").read_bytes()
    assert np.array_equal(np.load(tmp_path / "n1" / "prototypes.npy"), np.load(tmp_path / "n2" / "prototypes.npy"))


def test_vit_b32_weights_file_round_trip(tmp_path, tiny_weights):
    """The paper's architecture through the path its weights take: a local file, loaded strictly."""
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    path = tmp_path / "ViT-B-32-random.pt"
    torch.save(ref.state_dict(), path)
    with pytest.warns(UserWarning, match="QuickGELU"):  # an unidentified file for ViT-B-32: choose explicitly
        model, preprocess = load_encoder("ViT-B/32", path)
    assert _same_weights(model, ref)
    pngs = _pngs(tmp_path / "png")[:2]
    emb = encode_images(model, preprocess, pngs, progress=False)
    with torch.no_grad():
        direct = ref.encode_image(torch.stack([preprocess(Image.open(p)) for p in pngs])).numpy()
    assert emb.shape == (2, 512)
    np.testing.assert_allclose(emb, direct, rtol=1e-5, atol=1e-5)
    del model, ref
    with pytest.raises(ValueError, match=r"ViT-B-32: .*missing key.*shape mismatch"), pytest.warns(UserWarning):
        load_encoder("ViT-B-32", tiny_weights)
    path.unlink()
