"""Tests for semmix_lib.mixing: the group plan, sharded/resumable mixed generation, reading it back."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from semmix_lib import edm, mixing
from semmix_lib.edm import build_edm
from semmix_lib.mixing import (
    GenerationMismatchError,
    MixedImages,
    check_images,
    class_pairs,
    class_vectors,
    format_seeds,
    generate_mixed,
    group_plan,
    main,
    parse_seeds,
    read_manifest,
    shard,
    to_uint8,
)

STEPS = 4  # few Heun steps: 7 network evaluations per batch


def tiny_net(channels: int = 1) -> nn.Module:
    """The untrained 4-class digits EDM. Its output layers start at ~1e-5 weights, so a class vector would
    change no pixel; the near-zero weights are redrawn (seeded) so that the condition visibly matters."""
    torch.manual_seed(0)
    net = build_edm("digits-small", 8, channels, 4).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and p.abs().max() < 1e-3:
                p.normal_(0, 0.05)
    return net


class ScaleNet(nn.Module):
    """Stub denoiser ``D(x) = a x`` that ignores the class vector."""

    img_channels, img_resolution, label_dim = 1, 8, 4

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, sigma, class_labels=None):
        return x.to(torch.float32) * self.a

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


@pytest.fixture(scope="module")
def net():
    return tiny_net()


def gen(net, seeds, out, n_mix=8, **kw):
    kw = dict(num_steps=STEPS, batch_size=16, progress=False) | kw
    return generate_mixed(net, group_plan(seeds, net.label_dim, n_mix), out, **kw)


def png_bytes(folder) -> dict[str, bytes]:
    root = folder / "images"
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def load_png(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


# ----------------------------------------------------------------------------------------------
# plan
# ----------------------------------------------------------------------------------------------


def test_class_pairs_lexicographic():
    assert class_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert class_pairs(2) == [(0, 1)]
    assert len(class_pairs(10)) == 45 and class_pairs(10)[-1] == (8, 9)
    plan = group_plan(range(4950), 100, 2)  # the plan's pair order is class_pairs' order
    assert list(zip(plan.c1[::2], plan.c2[::2])) == class_pairs(100)
    with pytest.raises(ValueError, match="at least 2"):
        class_pairs(1)


def test_group_plan_by_hand():
    plan = group_plan("0-13", 4, n_mix=8)
    assert len(plan) == 14 * 8
    assert list(plan.columns) == ["image_id", "group", "seed", "c1", "c2", "lam_index", "lam", "path"]
    groups = plan.drop_duplicates("group")
    assert groups["seed"].tolist() == list(range(14))
    # pair number = group mod 6: groups 0-5 walk the pairs, 6-11 again, 12 and 13 start a third round
    want = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)] * 2 + [(0, 1), (0, 2)]
    assert list(zip(groups["c1"], groups["c2"])) == want
    assert tuple(groups.loc[groups.group == 6, ["c1", "c2"]].iloc[0]) == (0, 1)
    assert tuple(groups.loc[groups.group == 13, ["c1", "c2"]].iloc[0]) == (0, 2)
    for _, rows in plan.groupby("group"):
        assert rows["lam_index"].tolist() == list(range(8))
        np.testing.assert_array_equal(rows["lam"].to_numpy(), np.linspace(0, 1, 8))
        assert rows[["seed", "c1", "c2"]].nunique().tolist() == [1, 1, 1]
    assert plan["lam"].iloc[:8].tolist() == pytest.approx([0, 1 / 7, 2 / 7, 3 / 7, 4 / 7, 5 / 7, 6 / 7, 1], abs=1e-15)
    assert plan["lam"].iloc[0] == 0.0 and plan["lam"].iloc[7] == 1.0  # pure endpoints, exactly
    assert plan["image_id"].is_unique and plan["path"].is_unique
    last = plan.iloc[-1]
    assert (last.image_id, last.group, last.seed, last.c1, last.c2, last.lam_index, last.lam) == \
        ("13_0_2_7", 13, 13, 0, 2, 7, 1.0)
    assert last.path == "images/000-002/13_0_2_1.0000.png"
    assert plan["path"].iloc[1] == "images/000-001/0_0_1_0.1429.png"
    assert plan.index.tolist() == list(range(112))


def test_group_plan_keeps_seed_order_and_validates():
    plan = group_plan([30, 7, 12], 3, n_mix=2)
    assert plan["seed"].tolist() == [30, 30, 7, 7, 12, 12]
    assert plan["group"].tolist() == [0, 0, 1, 1, 2, 2]
    assert plan["lam"].tolist() == [0.0, 1.0] * 3
    assert plan["path"].tolist()[2:4] == ["images/000-002/7_0_2_0.0000.png", "images/000-002/7_0_2_1.0000.png"]
    assert group_plan("0", 1000, 2)["path"].iloc[0] == "images/000-001/0_0_1_0.0000.png"
    assert group_plan("0", 1001, 2)["path"].iloc[0] == "images/0000-0001/0_0_1_0.0000.png"
    with pytest.raises(ValueError, match="no seeds"):
        group_plan([], 4)
    with pytest.raises(ValueError, match="duplicate"):
        group_plan([1, 2, 1], 4)
    with pytest.raises(ValueError, match="n_mix"):
        group_plan("0-3", 4, n_mix=1)
    with pytest.raises(ValueError, match="num_classes"):
        group_plan("0-3", 1)


@pytest.mark.parametrize("seeds, classes, per_pair, rows", [
    ("0-19979", 10, 444, 159_840),   # CIFAR-10
    ("0-19799", 100, 4, 158_400),    # CIFAR-100
    ("0-39799", 200, 2, 318_400),    # Tiny-ImageNet
])
def test_group_plan_paper_counts(seeds, classes, per_pair, rows):
    plan = group_plan(seeds, classes, 8)
    assert len(plan) == rows and plan["group"].nunique() == rows // 8
    per = plan.groupby(["c1", "c2"])["group"].nunique()
    assert len(per) == classes * (classes - 1) // 2
    assert (per == per_pair).all()
    assert plan["image_id"].is_unique and plan["path"].is_unique


def test_parse_and_format_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds(" 0-2, 5 ,7-8") == [0, 1, 2, 5, 7, 8]
    assert parse_seeds("4") == [4]
    assert parse_seeds(7) == [7] and parse_seeds(np.int64(7)) == [7]
    assert parse_seeds([3, 1, 2]) == [3, 1, 2]
    assert parse_seeds(range(2, 5)) == [2, 3, 4]
    assert parse_seeds(np.array([5, 6])) == [5, 6]
    assert len(parse_seeds("0-19979")) == 19980
    assert format_seeds([0, 1, 2, 5, 7, 8, 3]) == "0-2,5,7-8,3"
    assert parse_seeds(format_seeds([0, 1, 2, 5, 7, 8, 3])) == [0, 1, 2, 5, 7, 8, 3]
    for bad, match in [("", "empty"), ("3-1", "start > end"), ("a", "cannot parse"), ("-1", "cannot parse"),
                       ("0-3,,5", "cannot parse"), ("d8,0-9", "duplication prefix"), ("0-3,2", "duplicate"),
                       ([1, 1], "duplicate"), ([-1], r"\[0, 2\*\*63"), ([], "no seeds")]:
        with pytest.raises(ValueError, match=match):
            parse_seeds(bad)
    for bad in [True, None, [1.5], 2.0]:
        with pytest.raises(TypeError):
            parse_seeds(bad)


def test_shard_partitions_groups():
    plan = group_plan("0-13", 4)
    parts = [shard(plan, r, 3) for r in range(3)]
    assert sorted(parts[1]["group"].unique().tolist()) == [1, 4, 7, 10, 13]
    assert parts[1].index.tolist() == [i for g in [1, 4, 7, 10, 13] for i in range(8 * g, 8 * g + 8)]
    pd.testing.assert_frame_equal(pd.concat(parts).sort_index(), plan)
    pd.testing.assert_frame_equal(shard(plan, 0, 1), plan)
    with pytest.raises(ValueError, match="rank"):
        shard(plan, 3, 3)


def test_class_vectors():
    plan = group_plan([0, 1], 4, n_mix=3)  # pairs (0, 1) then (0, 2)
    c = class_vectors(plan, 4)
    assert c.dtype == torch.float32
    expect = torch.tensor([[0, 1, 0, 0], [0.5, 0.5, 0, 0], [1, 0, 0, 0],
                           [0, 0, 1, 0], [0.5, 0, 0.5, 0], [1, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(c, expect)


def test_to_uint8_truncates_like_official():
    x = torch.tensor([-1.01, -1.0, -0.996, -0.5, 0.0, 0.5, 0.996, 1.0, 2.0], dtype=torch.float64)
    # x * 127.5 + 128 = -0.78, 0.5, 1.01, 64.25, 128, 191.75, 254.99, 255.5, 383 -> clip, truncate
    assert to_uint8(x.reshape(1, 1, 1, -1)).ravel().tolist() == [0, 0, 1, 64, 128, 191, 254, 255, 255]
    rgb = torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = to_uint8(rgb)
    assert out.shape == (2, 2, 2, 3) and out.dtype == np.uint8
    assert out[1, 1, 0].tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="N, C, H, W"):
        to_uint8(torch.zeros(1, 2, 2))


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------


def test_group_shares_one_latent(tmp_path, net):
    gen(ScaleNet().eval(), "0-2", tmp_path / "stub")
    for g, rows in read_manifest(tmp_path / "stub").groupby("group"):
        imgs = [load_png(tmp_path / "stub" / p) for p in rows["path"]]
        assert all(np.array_equal(imgs[0], im) for im in imgs[1:]), f"group {g}: labels are ignored, noise shared"
        assert imgs[0].std() > 5  # not a blank image
    first = [load_png(tmp_path / "stub" / p) for p in read_manifest(tmp_path / "stub").drop_duplicates("group").path]
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[1], first[2])

    gen(net, "0-2", tmp_path / "real")
    manifest = read_manifest(tmp_path / "real")
    for _, rows in manifest.groupby("group"):
        imgs = [load_png(tmp_path / "real" / p).astype(int) for p in rows["path"]]
        assert len({im.tobytes() for im in imgs}) == 8  # the soft class vector changes every image
        # ... but the shared noise keeps neighbours of a group closer than the same lam across groups
        assert np.abs(imgs[0] - imgs[1]).mean() < np.abs(imgs[0] - imgs[7]).mean()
    a, b = (manifest[manifest.group == g].path.iloc[0] for g in (0, 1))
    assert np.abs(load_png(tmp_path / "real" / a).astype(int) - load_png(tmp_path / "real" / b)).mean() > 10


def test_generation_folder_contents(tmp_path, net):
    rows = gen(net, "0-5", tmp_path)
    plan = group_plan("0-5", 4)
    pd.testing.assert_frame_equal(rows, plan)
    pd.testing.assert_frame_equal(read_manifest(tmp_path), plan)
    assert sorted(os.listdir(tmp_path)) == ["generation.json", "images", "manifest.csv"]
    assert sorted(png_bytes(tmp_path)) == sorted(plan["path"])
    settings = json.loads((tmp_path / "generation.json").read_text())
    assert settings["sampler"] == {"name": "edm-heun", "num_steps": STEPS, "sigma_min": 0.002, "sigma_max": 80.0,
                                   "rho": 7.0, "S_churn": 0.0, "S_min": 0.0, "S_max": "inf", "S_noise": 1.0}
    assert (settings["seeds"], settings["n_mix"], settings["num_classes"], settings["num_images"]) == ("0-5", 8, 4, 48)
    with Image.open(tmp_path / plan.path[0]) as img:
        assert img.mode == "L" and img.size == (8, 8)
    check_images(tmp_path)


def test_sharding_and_batch_size_give_identical_files(tmp_path, net):
    gen(net, "0-5", tmp_path / "one", batch_size=16)
    two = tmp_path / "two"
    mine = gen(net, "0-5", two, batch_size=8, rank=0, world_size=2)
    assert sorted(mine["group"].unique()) == [0, 2, 4]
    assert sorted(png_bytes(two)) == sorted(mine["path"])  # rank 0 wrote only its own groups
    other = gen(net, "0-5", two, batch_size=8, rank=1, world_size=2)
    assert sorted(other["group"].unique()) == [1, 3, 5]
    ref, got = png_bytes(tmp_path / "one"), png_bytes(two)
    assert len(ref) == 48 and ref.keys() == got.keys()
    assert sorted(k for k in ref if ref[k] != got[k]) == []
    assert (two / "manifest.csv").read_bytes() == (tmp_path / "one" / "manifest.csv").read_bytes()


def test_batch_invariance_when_n_mix_is_not_a_multiple_of_eight(tmp_path, net, monkeypatch):
    """Rows of a group are padded to a multiple of ROW_ALIGN, so the sampler's float outputs of a group are
    bitwise the same for any batch size and world size, also for groups of 3 (on this CPU a 3-row call
    differs from a 9-row one by ~1e-5 without the padding)."""
    real = edm.heun_sampler
    outputs: dict[bytes, bytes] = {}

    def recording(net_, latents, labels, **kw):
        x = real(net_, latents, labels, **kw)
        block = 3 + (-3 % mixing.ROW_ALIGN)
        for start in range(0, len(x), block):  # key: the group's noise; value: its 3 real images
            key = latents[start].numpy().tobytes()
            assert key not in outputs
            outputs[key] = x[start:start + 3].numpy().tobytes()
        return x

    monkeypatch.setattr(edm, "heun_sampler", recording)
    gen(net, "0-5", tmp_path / "a", n_mix=3, batch_size=3)
    ref = dict(outputs)
    outputs.clear()
    for r in range(2):
        gen(net, "0-5", tmp_path / "b", n_mix=3, batch_size=9, rank=r, world_size=2)
    assert len(ref) == 6 and ref.keys() == outputs.keys()
    differing = sum(ref[k] != outputs[k] for k in ref)
    assert differing == 0, f"{differing} of 6 groups changed with the batch size / world size"
    assert png_bytes(tmp_path / "a") == png_bytes(tmp_path / "b")


def test_stochastic_sampling_noise_is_per_group(tmp_path):
    stub = ScaleNet().eval()  # ignores labels: a group's images differ only if their churn noise did
    gen(stub, "0-3", tmp_path / "a", S_churn=40, batch_size=8)
    gen(stub, "0-3", tmp_path / "b", S_churn=40, batch_size=32)
    gen(stub, "0-3", tmp_path / "c", batch_size=32)
    a = png_bytes(tmp_path / "a")
    assert a == png_bytes(tmp_path / "b") and a != png_bytes(tmp_path / "c")
    for _, rows in read_manifest(tmp_path / "a").groupby("group"):
        assert len({a[p] for p in rows["path"]}) == 1


def test_resume_regenerates_only_missing_groups(tmp_path, net, monkeypatch):
    gen(net, "0-5", tmp_path / "ref")
    out = tmp_path / "run"
    gen(net, "0-5", out)
    plan = read_manifest(out)
    gone = [plan.path[8 * 1 + 3], plan.path[8 * 4], plan.path[8 * 4 + 7]]  # groups 1 and 4
    for p in gone:
        (out / p).unlink()
    stray = out / "images" / "000-001" / ".0_0_1_0.0000.png.abc123.tmp"
    stray.write_bytes(b"half a png")
    untouched = plan.path[plan.group.isin([0, 2, 3, 5])]
    mtimes = {p: (out / p).stat().st_mtime_ns for p in untouched}

    calls = []
    real = edm.heun_sampler
    monkeypatch.setattr(edm, "heun_sampler", lambda n, lat, *a, **k: calls.append(len(lat)) or real(n, lat, *a, **k))
    gen(net, "0-5", out, batch_size=64)
    assert calls == [16]  # one batch holding the two incomplete groups
    assert {p: (out / p).stat().st_mtime_ns for p in untouched} == mtimes
    got = png_bytes(out)
    assert got == png_bytes(tmp_path / "ref")
    check_images(out)  # the stray temp file is not a PNG of the folder

    calls.clear()
    gen(net, "0-5", out)  # complete: nothing to do
    assert calls == []


def test_interrupted_write_leaves_no_partial_png(tmp_path, net, monkeypatch):
    saved = []
    real_save = Image.Image.save

    def flaky_save(self, fp, *args, **kwargs):
        if len(saved) == 10:
            with open(fp, "wb") as f:
                f.write(b"\x89PNG partial")
            raise KeyboardInterrupt
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        gen(net, "0-5", tmp_path)
    monkeypatch.undo()
    files = [p for p in (tmp_path / "images").rglob("*") if p.is_file()]
    assert len(files) == 10 and all(p.suffix == ".png" for p in files)  # no partial file, no temp file left
    with pytest.raises(ValueError, match="38 missing"):
        check_images(tmp_path)
    gen(net, "0-5", tmp_path)
    gen(net, "0-5", tmp_path / "ref")
    assert png_bytes(tmp_path) == png_bytes(tmp_path / "ref")


def test_other_settings_in_same_folder_are_refused(tmp_path, net):
    gen(net, "0-5", tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(GenerationMismatchError, match=r"sampler.num_steps: 4 \(folder\) vs 5 \(now\)"):
        gen(net, "0-5", tmp_path, num_steps=STEPS + 1)
    with pytest.raises(GenerationMismatchError, match="seeds: '0-5' \\(folder\\) vs '0-6'"):
        gen(net, "0-6", tmp_path)
    with pytest.raises(GenerationMismatchError, match="n_mix"):
        gen(net, "0-5", tmp_path, n_mix=4)
    with pytest.raises(GenerationMismatchError, match="extra"):
        gen(net, "0-5", tmp_path, extra={"checkpoint_sha256": "abc"})
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before

    foreign = tmp_path / "foreign"
    (foreign / "images" / "x").mkdir(parents=True)
    Image.new("L", (8, 8)).save(foreign / "images" / "x" / "a.png")
    with pytest.raises(GenerationMismatchError, match="no generation.json"):
        gen(net, "0-5", foreign)
    assert not (foreign / "generation.json").exists() and not (foreign / "manifest.csv").exists()


def test_generate_rejects_bad_inputs(tmp_path, net):
    with pytest.raises(ValueError, match="not group_plan"):
        generate_mixed(net, group_plan("0-5", 5), tmp_path, num_steps=STEPS, progress=False)  # 5 != 4 classes
    with pytest.raises(ValueError, match="pass the whole"):
        generate_mixed(net, shard(group_plan("0-5", 4), 1, 2), tmp_path, num_steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="training mode"):
        generate_mixed(tiny_net().train(), group_plan("0-5", 4), tmp_path, num_steps=STEPS, progress=False)
    assert not any(tmp_path.iterdir())


def test_check_images_names_missing_and_extra(tmp_path, net):
    gen(net, "0-5", tmp_path)
    plan = read_manifest(tmp_path)
    (tmp_path / plan.path[17]).unlink()
    Image.new("L", (8, 8)).save(tmp_path / "images" / "000-001" / "99_0_1_0.0000.png")
    with pytest.raises(ValueError) as err:
        check_images(tmp_path)
    msg = str(err.value)
    assert "1 missing" in msg and plan.path[17] in msg
    assert "1 PNG(s) not in the manifest" in msg and "images/000-001/99_0_1_0.0000.png" in msg
    with pytest.raises(FileNotFoundError, match="manifest.csv"):
        check_images(tmp_path / "nothing")


def test_mixed_images_round_trip(tmp_path, net):
    gen(net, "0-5", tmp_path)
    ds = MixedImages(tmp_path)
    plan = group_plan("0-5", 4)
    assert len(ds) == 48
    pd.testing.assert_frame_equal(ds.manifest, plan)
    x, i = ds[13]
    assert i == 13 and x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.05
    raw = load_png(tmp_path / plan.path[13])
    assert torch.equal(x[0], torch.from_numpy(raw.astype(np.float32) / 127.5 - 1))
    row = ds.manifest.iloc[i]
    assert (row.seed, row.c1, row.c2, row.lam_index) == (1, 0, 2, 5)
    assert MixedImages(tmp_path, transform=lambda img: (img.mode, img.size))[0] == (("L", (8, 8)), 0)
    with pytest.raises(IndexError):
        ds[48]

    rgb = tmp_path / "rgb"
    generate_mixed(tiny_net(3), group_plan("0-1", 4, n_mix=3), rgb, num_steps=STEPS, progress=False)
    with Image.open(rgb / read_manifest(rgb).path[0]) as img:
        assert img.mode == "RGB"
    x, _ = MixedImages(rgb)[2]
    assert x.shape == (3, 8, 8)


def test_main_cli_single_process(tmp_path, net, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ckpt = tmp_path / "net.pt"
    ckpt.write_bytes(b"stand-in checkpoint")
    seen = {}

    def fake_load(path, key="ema", device="cpu"):
        seen.update(path=str(path), device=str(device))
        return net

    monkeypatch.setattr(edm, "load_edm_checkpoint", fake_load)
    out = tmp_path / "gen"
    assert main(["--checkpoint", str(ckpt), "--out", str(out), "--seeds", "0-2,7", "--num-steps", str(STEPS),
                 "--batch-size", "16", "--device", "cpu", "--no-progress"]) == 0
    assert seen == {"path": str(ckpt), "device": "cpu"}
    pd.testing.assert_frame_equal(read_manifest(out), group_plan([0, 1, 2, 7], 4))
    check_images(out)
    settings = json.loads((out / "generation.json").read_text())
    assert settings["seeds"] == "0-2,7" and len(settings["extra"]["checkpoint_sha256"]) == 64
    gen(net, [0, 1, 2, 7], tmp_path / "lib", extra=settings["extra"])
    assert png_bytes(out) == png_bytes(tmp_path / "lib")
