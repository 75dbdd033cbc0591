"""Write a randomly initialised LLaVA of LLaVA-1.5 sequence geometry to a folder, for `mmscope check` and the GPU
suite: `--geometry 7b` is LLaVA-1.5-7B's decoder and CLIP ViT-L tower (random weights), `small` a `--width`-wide
decoder (`knockout_sweep.py`'s model).

    python benchmarks/random_model.py --geometry 7b --dtype bfloat16 --out /tmp/llava-7b-random
    mmscope check --model /tmp/llava-7b-random --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from knockout_sweep import GEOMETRIES, build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the checkpoint into")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="small")
    parser.add_argument("--width", type=int, default=64, help="decoder hidden size (geometry small)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.manual_seed(0)
    geometry = GEOMETRIES[args.geometry] or {"width": args.width}
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.out, layers=args.layers, device="cpu", dtype=args.dtype, **geometry)
    print(f"wrote {args.out}: random LLaVA, {model.n_layers} layers x width {model.adapter.text_config.hidden_size}, "
          f"{args.dtype}")


if __name__ == "__main__":
    main()
