#!/usr/bin/env python3
"""PyTorch's grouped GEMMs on the shapes of `epmoe bench --kernel gemm` (what a user would pick
instead of epmoe's kernels): torch._grouped_mm (bf16) and torch._scaled_grouped_mm (FP8 e4m3 with
ROW-wise scales: PyTorch has no 128x128 block-scaled grouped GEMM on Hopper, so its FP8 numbers
are for a coarser quantisation than DeepSeek's).

DeepSeek-V3 experts (H 7168, I 2048): gate_up (N 4096, K 7168) and down (N 7168, K 2048);
E_loc in {256, 32, 8} (R = 256 / E_loc ranks, each bringing T tokens); top-8 uniformly random
routing. Contiguous layout: 2-D x 3-D with `offs` (the cumulative row ends per expert); masked
layout (T <= 512): 3-D x 3-D over [E_loc, M_max = R*T, K] (every row of M_max is computed: PyTorch
has no per-expert count there). Median of CUDA-event timed runs after warm-up, a 256 MB buffer
written before each run (L2 flush), random data.

Usage: python bench/torch_grouped_mm.py [--tokens 128,4096,16384] [--iters 20] [--warmup 5]
                                        [--json FILE]
"""
import argparse
import json
import statistics
import sys

import torch

H, I, E, TOPK = 7168, 2048, 256, 8


def route_counts(tokens, e_loc, gen):
    """Rows per local expert [0, e_loc) when `tokens` tokens pick TOPK distinct experts of E."""
    counts = torch.zeros(e_loc, dtype=torch.int64, device="cuda")
    chunk = 65536
    for t0 in range(0, tokens, chunk):
        n = min(chunk, tokens - t0)
        ids = torch.rand(n, E, device="cuda", generator=gen).argsort(dim=1)[:, :TOPK].flatten()
        ids = ids[ids < e_loc]
        counts += torch.bincount(ids, minlength=e_loc)
    return counts.to(torch.int32)


class Timer:
    def __init__(self, iters, warmup):
        self.iters, self.warmup = iters, warmup
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def median_us(self, fn):
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            self.flush.zero_()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) * 1e3)
        return statistics.median_high(times)


def try_time(timer, fn):
    """Median µs, or the error text when PyTorch refuses the shapes."""
    try:
        fn()
        torch.cuda.synchronize()
        return timer.median_us(fn), None
    except (RuntimeError, TypeError, NotImplementedError) as e:  # unsupported on this build/GPU
        return 0.0, str(e).splitlines()[0][:160]


def to_fp8(x):
    return x.clamp(-448, 448).to(torch.float8_e4m3fn)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="128,4096,16384")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    if not torch.cuda.is_available():
        print("torch_grouped_mm: no CUDA device", file=sys.stderr)
        return 2
    have_gmm = hasattr(torch, "_grouped_mm")
    have_sgmm = hasattr(torch, "_scaled_grouped_mm")
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}; _grouped_mm: {have_gmm}; "
          f"_scaled_grouped_mm: {have_sgmm}")
    timer = Timer(args.iters, args.warmup)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(torch.seed() & 0xFFFFFFFF)
    rows = []
    hdr = f"{'gemm':<8} {'layout':<10} {'E_loc':>5} {'T':>6} {'rows':>7} | {'bf16_us':>9} {'TF/s':>6} | {'fp8_us':>9} {'TF/s':>6} | note"
    print(hdr)
    for e_loc in (256, 32, 8):
        ranks = E // e_loc
        counts = [route_counts(ranks * t, e_loc, gen) for t in tokens]
        for name, n_out, k in (("gate_up", 2 * I, H), ("down", H, I)):
            # Weights [E_loc, N, K] as checkpoints store them; PyTorch takes mat_b [G, K, N]
            # (a transposed view: K-major, which is what the kernels want).
            w = torch.randn(e_loc, n_out, k, device="cuda", dtype=torch.bfloat16) * 0.05
            wt = w.transpose(1, 2)
            w8 = to_fp8(w * 20).transpose(1, 2)
            w8_scale = torch.rand(e_loc, n_out, device="cuda", dtype=torch.float32) * 0.01 + 0.01
            for ti, t in enumerate(tokens):
                cnt = counts[ti]
                n_rows = int(cnt.sum().item())
                offs = torch.cumsum(cnt, 0).to(torch.int32)
                x = torch.randn(max(n_rows, 1), k, device="cuda", dtype=torch.bfloat16)
                x8 = to_fp8(x * 50)
                x8_scale = torch.rand(x.shape[0], device="cuda", dtype=torch.float32) * 0.01 + 0.01
                flops = 2.0 * n_rows * n_out * k
                notes = []
                bf16_us = fp8_us = 0.0
                if have_gmm:
                    bf16_us, err = try_time(timer, lambda: torch._grouped_mm(x, wt, offs=offs))
                    if err:
                        notes.append("bf16: " + err)
                if have_sgmm:
                    fp8_us, err = try_time(timer, lambda: torch._scaled_grouped_mm(
                        x8, w8, x8_scale, w8_scale, offs=offs, out_dtype=torch.bfloat16))
                    if err:
                        notes.append("fp8: " + err)
                rows.append(dict(gemm=name, layout="contiguous", e_loc=e_loc, tokens=t,
                                 rows=n_rows, n_out=n_out, k=k, bf16_us=bf16_us,
                                 bf16_tflops=flops / (bf16_us * 1e6) if bf16_us else 0.0,
                                 fp8_us=fp8_us,
                                 fp8_tflops=flops / (fp8_us * 1e6) if fp8_us else 0.0,
                                 note="; ".join(notes)))
                if t <= 512:
                    m_max = ranks * t
                    xm = torch.randn(e_loc, m_max, k, device="cuda", dtype=torch.bfloat16)
                    xm8 = to_fp8(xm * 50)
                    xm8_scale = torch.rand(e_loc, m_max, device="cuda") * 0.01 + 0.01
                    mnotes = ["all M_max rows computed"]
                    mb = mf = 0.0
                    if have_gmm:
                        mb, err = try_time(timer, lambda: torch._grouped_mm(xm, wt))
                        if err:
                            mnotes.append("bf16: " + err)
                    if have_sgmm:
                        mf, err = try_time(timer, lambda: torch._scaled_grouped_mm(
                            xm8, w8, xm8_scale, w8_scale, out_dtype=torch.bfloat16))
                        if err:
                            mnotes.append("fp8: " + err)
                    # TFLOP/s over the real rows (what the layer needs), as epmoe's bench counts.
                    rows.append(dict(gemm=name, layout="masked", e_loc=e_loc, tokens=t,
                                     rows=n_rows, n_out=n_out, k=k, bf16_us=mb,
                                     bf16_tflops=flops / (mb * 1e6) if mb else 0.0, fp8_us=mf,
                                     fp8_tflops=flops / (mf * 1e6) if mf else 0.0,
                                     note="; ".join(mnotes)))
                for r in rows[-2 if t <= 512 else -1:]:
                    print(f"{r['gemm']:<8} {r['layout']:<10} {r['e_loc']:>5} {r['tokens']:>6} "
                          f"{r['rows']:>7} | {r['bf16_us']:>9.1f} {r['bf16_tflops']:>6.0f} | "
                          f"{r['fp8_us']:>9.1f} {r['fp8_tflops']:>6.0f} | {r['note']}")
                    sys.stdout.flush()
                del x, x8, x8_scale
            del w, wt, w8, w8_scale
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, torch=torch.__version__, iters=args.iters,
                           warmup=args.warmup,
                           notes="FP8 = _scaled_grouped_mm with row-wise scales (no block "
                                 "scaling in PyTorch's grouped GEMM); masked = 3-D x 3-D over "
                                 "M_max rows; TFLOP/s over the routed rows",
                           rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
