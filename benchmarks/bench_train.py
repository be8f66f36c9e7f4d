"""Training throughput: semmix's loop against a bare PyTorch loop, and the cost of CSM's extra images.

    python benchmarks/bench_train.py [--model small_cnn] [--epochs 5] [--device cpu]

Same model, batch size, data and optimiser. "bare" is the minimal SGD loop (forward, CE, backward,
clip, step); "semmix ce" is ``semmix_lib.train``'s epoch through the method registry; "semmix csm"
adds the generated images CSM trains on (endpoint + ``n_aug`` middle images per real image, so three
times the images per step with n_aug = 1), drawn from a synthetic annotated generation folder.
"""

import argparse
import tempfile
import time

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader

from semmix_lib import data
from semmix_lib.csm_data import CSMPairs, generated_transform
from semmix_lib.losses import build_method
from semmix_lib.models import build_model
from semmix_lib.train import TrainConfig, _train_epoch


def fake_generation(root, num_classes, shape, n_mix=8, groups_per_pair=2):
    rows, rng = [], np.random.default_rng(0)
    pairs = [(a, b) for a in range(num_classes) for b in range(a + 1, num_classes)]
    for g in range(len(pairs) * groups_per_pair):
        c1, c2 = pairs[g % len(pairs)]
        for j in range(n_mix):
            rel = f"{g}_{j}.png"
            img = rng.integers(0, 256, (shape[1], shape[2]) + ((3,) if shape[0] == 3 else ()), dtype=np.uint8)
            Image.fromarray(img).save(f"{root}/{rel}")
            lam = j / (n_mix - 1)
            rows.append(dict(path=rel, group=g, c1=c1, c2=c2, lam_index=j, lam=lam, soft_label=lam))
    return pd.DataFrame(rows)


def bare_epoch(model, loader, opt, device):
    model.train()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()


def timed(fn, epochs, device):
    fn()  # warm-up epoch
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(epochs):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / epochs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    splits = data.load_dataset("digits")
    cfg = TrainConfig(model=args.model, batch_size=args.batch_size)
    n = len(splits.train)
    results = {}
    for name in ("bare", "semmix ce", "semmix csm"):
        torch.manual_seed(0)
        model = build_model(args.model, splits.num_classes, 1, 8).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        if name == "bare":
            loader = DataLoader(splits.train, batch_size=args.batch_size, shuffle=True)
            results[name] = timed(lambda: bare_epoch(model, loader, opt, device), args.epochs, device)
            continue
        method = build_method(name.split()[1], splits.num_classes)
        train_set = splits.train
        if method.uses_generated:
            root = tempfile.mkdtemp()
            table = fake_generation(root, splits.num_classes, splits.image_shape)
            train_set = CSMPairs(splits.train, root, table, splits.num_classes, generated_transform(splits))
        loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
        results[name] = timed(lambda: _train_epoch(model, loader, method, opt, cfg, device), args.epochs, device)
    print(f"model {args.model}, batch {args.batch_size}, {n} real images per epoch, device {device}")
    for name, sec in results.items():
        print(f"  {name:<11} {sec:7.3f} s/epoch  {n / sec:8.0f} real images/s  "
              f"{results['bare'] / sec:5.2f}x bare")


if __name__ == "__main__":
    main()
