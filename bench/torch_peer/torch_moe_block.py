#!/usr/bin/env python3
"""The PyTorch eager MoE block that CPU users run (the loop of Mixtral's reference block), timed on
bench_moe_layer's host shapes: forward, and forward + backward, median over reps.

  python3 torch_moe_block.py --threads 2 --dtype fp32|bf16 [--shape NAME ...] [--reps N] [--json out.json]

The block: router logits x W_r^T, softmax, top-k (gates = the picked probabilities, as moekit's
default, no renormalisation), per expert the rows that picked it (index_select), SwiGLU
w2(silu(w1 x) * w3 x) times the gate, index_add_ back into y; the load-balancing loss
N * sum_i f_i P_i and the z-loss in the graph, as moekit's layer computes them. Backward from a fixed
dy on y plus the aux losses. Weights and activations in the dtype (bf16: PyTorch's oneDNN bf16 kernels).
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {  # name: (tokens, d_model, d_expert, experts, top_k), as bench/moe_layer/main.cpp
    "cpu-mixtral-mini": (2048, 512, 1024, 8, 2),
    "cpu-fine": (4096, 256, 128, 64, 8),
    "quick": (256, 64, 128, 8, 2),
}


class EagerMoe(torch.nn.Module):
    def __init__(self, d, f, n, k, lbl_coef=0.01, zloss_coef=0.0):
        super().__init__()
        self.n, self.k, self.lbl_coef, self.zloss_coef = n, k, lbl_coef, zloss_coef
        self.router = torch.nn.Linear(d, n, bias=False)
        self.w1 = torch.nn.ModuleList(torch.nn.Linear(d, f, bias=False) for _ in range(n))
        self.w3 = torch.nn.ModuleList(torch.nn.Linear(d, f, bias=False) for _ in range(n))
        self.w2 = torch.nn.ModuleList(torch.nn.Linear(f, d, bias=False) for _ in range(n))

    def forward(self, x):
        logits = self.router(x).float()  # router math in fp32, as moekit's
        probs = logits.softmax(dim=-1)
        gates, idx = probs.topk(self.k, dim=-1)
        y = torch.zeros_like(x)
        onehot = F.one_hot(idx, self.n)  # [T, k, N]
        for e in range(self.n):
            tok, slot = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            xe = x.index_select(0, tok)
            he = F.silu(self.w1[e](xe)) * self.w3[e](xe)
            ye = self.w2[e](he) * gates[tok, slot].unsqueeze(-1).to(x.dtype)
            y.index_add_(0, tok, ye)
        f = onehot.sum(dim=(0, 1)).float() / (x.shape[0] * self.k)
        lbl = self.n * (f * probs.mean(dim=0)).sum()
        zloss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return y, self.lbl_coef * lbl + self.zloss_coef * zloss


def median_ms(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    rows = []
    for name in a.shape or ["cpu-mixtral-mini", "cpu-fine"]:
        T, d, f, n, k = SHAPES[name]
        block = EagerMoe(d, f, n, k).to(dt)
        x = torch.rand(T, d, dtype=dt) * 2 - 1
        dy = torch.rand(T, d, dtype=dt) * 2 - 1

        def fwd():
            block(x)

        def fwd_bwd():
            y, aux = block(x)
            torch.autograd.backward([y, aux], [dy, torch.ones_like(aux)])

        row = {"shape": name, "dtype": a.dtype, "fwd_ms": median_ms(fwd, a.reps), "fwd_bwd_ms": median_ms(fwd_bwd, a.reps)}
        rows.append(row)
        print(f"torch {torch.__version__} {a.dtype} {name}: forward {row['fwd_ms']:.1f} ms, forward+backward {row['fwd_bwd_ms']:.1f} ms",
              flush=True)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "config": torch.__config__.show(),
           "python": sys.version.split()[0], "rows": rows}
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
