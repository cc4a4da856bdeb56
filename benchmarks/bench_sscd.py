"""SSCD throughput: images per second, batched vs one at a time (ResNet50 variant, random weights, the paper
preset: 256 short side -> 224 crop), on the CPU or a GPU. Prints figures; asserts nothing.

    python -m benchmarks.bench_sscd [--images 32] [--batch 16] [--threads 2] [--device cpu|cuda]
"""
import argparse
import time

import torch

from finextract_core.sscd import embed_images
from finextract_core.sscd_network import RESNET50, SSCDModel


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (float16 autocast there, as the node runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SSCDModel(RESNET50, "random").eval()
    images = torch.rand(args.images, 256, 256, 3)
    embed_images(model, images[:2], batch_size=2, device=args.device)  # warm-up: allocator and kernel selection
    embed_images(model, images[:args.batch], batch_size=args.batch, device=args.device)
    print(f"torch {torch.__version__}, {args.device}, {args.threads} thread(s), {args.images} images 256x256 -> "
          "paper preset (224)")
    for label, batch_size in (("one at a time", 1), (f"batch {args.batch}", args.batch)):
        began = time.perf_counter()
        embed_images(model, images, batch_size=batch_size, device=args.device)  # returns numpy: synchronised
        seconds = time.perf_counter() - began
        print(f"  {label:<14} {args.images / seconds:6.2f} images/s ({seconds:.2f} s)")


if __name__ == "__main__":
    main()
