"""``python -m dinat.kernels``: a short tour of the NA op on this machine.

Runs one DiNAT-like 2-D layer (56x56 tokens, 2 heads of 32, 7x7 window, dilation 1 and 8) on every
backend available for the device, checks each against the reference and prints times.
"""

from __future__ import annotations

import argparse
import time

import torch

from dinat import kernels


def _time(fn, repeats: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    backends = kernels.available_backends(device)
    # Under the CPU interpreter Triton is far too slow for this size; show the reference only.
    if device.type == "cpu":
        backends = ["reference"]
    print(f"torch {torch.__version__}, device {device}, dtype {dtype}, backends {backends}")
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.size, args.size, 2, 32)
    q, k, v = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
    rpb = (0.02 * torch.randn(2, 13, 13, generator=gen)).to(device, dtype)
    for dilation in (1, 8):
        ref = kernels.na2d(q, k, v, 7, dilation, rpb=rpb, backend="reference")
        for name in backends:
            out = kernels.na2d(q, k, v, 7, dilation, rpb=rpb, backend=name)
            err = (out.float() - ref.float()).abs().max().item()
            ms = _time(lambda: kernels.na2d(q, k, v, 7, dilation, rpb=rpb, backend=name), args.repeats)
            print(f"na2d {tuple(shape)} k=7 dilation={dilation} backend={name:9s} {ms:8.2f} ms  max|err| {err:.2e}")
    # The window rule at a border: with dilation 2, the corner query of an 8x8 map attends to rows
    # and columns 0, 2, 4 -- its window is shifted inward, not padded.
    nb_rows, _, _ = kernels.geometry.axis_window(8, 3, 2, False)
    print(f"8x8 map, k=3, dilation 2: query row 0 sees rows {nb_rows[0].tolist()}, row 7 sees {nb_rows[7].tolist()}")


if __name__ == "__main__":
    main()
