"""CSM's pairing of real images with generated ones (PAPER.md section 3)."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from semmix_lib.csm_data import CSMPairs
from semmix_lib.data import ArrayDataset

N_MIX = 8


@pytest.fixture()
def folder(tmp_path):
    """Two groups: (0, 1) and (1, 2). Image value encodes (group, lam_index); soft labels shuffled
    so that the order by soft label differs from the order by lam."""
    rows = []
    for group, (c1, c2) in enumerate([(0, 1), (1, 2)]):
        soft = np.linspace(0.05, 0.95, N_MIX)
        soft[[2, 5]] = soft[[5, 2]]  # the reannotation disagrees with lam at two positions
        for j in range(N_MIX):
            path = f"images/{group}_{j}.png"
            (tmp_path / "images").mkdir(exist_ok=True)
            Image.fromarray(np.full((4, 4), 10 * group + j, np.uint8)).save(tmp_path / path)
            rows.append(dict(image_id=f"{group}_{j}", path=path, group=group, seed=group, c1=c1, c2=c2,
                             lam_index=j, lam=j / (N_MIX - 1), lam_clip=soft[j], soft_label=soft[j]))
    return tmp_path, pd.DataFrame(rows)


def _pairs(folder, labels, **kw):
    gen_dir, table = folder
    real = ArrayDataset(torch.zeros(len(labels), 1, 4, 4), labels)
    to_value = lambda im: torch.tensor(np.asarray(im), dtype=torch.float32)[None]  # noqa: E731 raw pixel values
    return CSMPairs(real, gen_dir, table, num_classes=3, transform=to_value, **kw), table


def test_endpoint_of_the_own_class_and_a_middle_image(folder):
    pairs, table = _pairs(folder, [0, 2, 1, 1])
    torch.manual_seed(0)
    for i, y in enumerate([0, 2, 1, 1]):
        x, label, gen_x, gen_t = pairs[i]
        assert label == y and gen_x.shape == (2, 1, 4, 4) and gen_t.shape == (2, 3)
        group, j_end = divmod(int(gen_x[0, 0, 0, 0]), 10)
        c1, c2 = [(0, 1), (1, 2)][group]
        assert y in (c1, c2)
        g = table[table.group == group].sort_values("soft_label", ascending=False)
        # y's endpoint in the group ordered by soft label: first if y == c1, last if y == c2
        assert j_end == (g.lam_index.iloc[0] if y == c1 else g.lam_index.iloc[-1])
        _, j_mid = divmod(int(gen_x[1, 0, 0, 0]), 10)
        assert j_mid in set(g.lam_index.iloc[1:-1])
        for k, j in enumerate([j_end, j_mid]):
            soft = float(table[(table.group == group) & (table.lam_index == j)].soft_label.iloc[0])
            assert gen_t[k, c1] == pytest.approx(soft) and gen_t[k, c2] == pytest.approx(1 - soft)
            assert gen_t[k].sum() == pytest.approx(1.0)


def test_class_1_draws_from_both_of_its_groups(folder):
    pairs, _ = _pairs(folder, [1] * 64)
    torch.manual_seed(1)
    groups = {int(pairs[i][2][0, 0, 0, 0]) // 10 for i in range(64)}
    assert groups == {0, 1}


def test_raw_lambda_targets(folder):
    pairs, table = _pairs(folder, [0], target="lam")
    torch.manual_seed(0)
    _, _, gen_x, gen_t = pairs[0]
    j_end = int(gen_x[0, 0, 0, 0]) % 10
    assert j_end == N_MIX - 1 and gen_t[0, 0] == pytest.approx(1.0)  # class 0 = c1: the lam = 1 image


def test_more_middle_images_without_repeats(folder):
    pairs, _ = _pairs(folder, [0], n_aug=3)
    torch.manual_seed(0)
    _, _, gen_x, _ = pairs[0]
    mids = [int(v) % 10 for v in gen_x[1:, 0, 0, 0]]
    assert len(set(mids)) == 3


def test_bad_inputs(folder):
    with pytest.raises(ValueError, match="n_aug"):
        _pairs(folder, [0], n_aug=7)
    gen_dir, table = folder
    only_first = table[table.group == 0]
    with pytest.raises(ValueError, match=r"class\(es\) \[2\]"):
        CSMPairs(ArrayDataset(torch.zeros(1, 1, 4, 4), [2]), gen_dir, only_first, 3, transform=lambda im: im)
