"""Annotation throughput: images per second through an open_clip image encoder.

    python benchmarks/bench_annotate.py [--device cpu] [--n 512]

Two encoders: the embedded study's small digits CLIP (8x8 inputs) and ViT-B-32 with random weights
at 224 px (the paper's architecture; the weights do not change the cost). Images are PNGs on disk
going through the model's own preprocessing, as in ``semmix_lib.annotation.encode_images``.
"""

import argparse
import tempfile
import time

import numpy as np
import open_clip
import torch
from PIL import Image

from semmix_lib import annotation, clip_train


def pngs(root, n, size, channels):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        shape = (size, size) + ((3,) if channels == 3 else ())
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(f"{root}/{i}.png")
        paths.append(f"{i}.png")
    return paths


def bench(name, model, preprocess, root, paths, device, batch_size):
    images = annotation.ImageFiles(root, paths)
    annotation.encode_images(model, preprocess, images, batch_size=batch_size, device=device, progress=False)
    t0 = time.perf_counter()
    annotation.encode_images(model, preprocess, images, batch_size=batch_size, device=device, progress=False)
    sec = time.perf_counter() - t0
    print(f"  {name:<28} {len(paths) / sec:9.1f} images/s  ({len(paths)} images, batch {batch_size})")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=512)
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    root = tempfile.mkdtemp()
    clip_train.register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(clip_train.DIGITS_CLIP)
    bench("semmix-digits-vit (8 px)", model.to(device).eval(), preprocess, root, pngs(root, args.n * 8, 8, 1),
          device, 256)
    root = tempfile.mkdtemp()
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    bench("ViT-B-32, random (224 px)", model.to(device).eval(), preprocess, root, pngs(root, args.n, 32, 3),
          device, 64)


if __name__ == "__main__":
    main()
