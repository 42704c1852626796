#!/usr/bin/env python3
"""Check moekit-layer against the same MoE layer written in PyTorch (see docs/harness.md).

    python tools/ref_layer.py make-input --config cfg.json --tokens 64 --seed 0 --input in.safetensors
    moekit-layer --config cfg.json --input in.safetensors --output out.safetensors
    python tools/ref_layer.py compare --config cfg.json --input in.safetensors --output out.safetensors

`compare` rebuilds the layer as an ordinary torch.nn.Module (Mixtral's parameter names, a loop over the
experts), runs it in float64 on the same inputs, backpropagates
L = sum(y * dy) + lbl_coef * LBL + zloss_coef * zloss, and compares every tensor of out.safetensors.
Needs `pip install torch safetensors`. Exit code: 0 all match, 1 some differ, 2 bad arguments or files.
"""
import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

REQUIRED = ("d_model", "d_expert", "num_ffn_experts", "top_k")
DEFAULTS = {"router": "softmax", "renormalize": False, "activation": "swiglu", "capacity_factor": 0.0,
            "lbl_coef": 0.0, "zloss_coef": 0.0, "backend": "host", "dtype": "fp32"}


class InputError(Exception):
    """A bad argument, config or file: reported with exit code 2."""


def load_config(path):
    with open(path) as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: the config must be a JSON object")
    unknown = sorted(set(cfg) - set(REQUIRED) - set(DEFAULTS))
    if unknown:
        raise InputError(f"{path}: unknown keys {unknown}")
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise InputError(f"{path}: missing keys {missing}")
    cfg = {**DEFAULTS, **cfg}
    if cfg["router"] not in ("softmax", "sigmoid"):
        raise InputError(f"{path}: router must be softmax or sigmoid")
    if cfg["activation"] not in ("swiglu", "gelu", "relu"):
        raise InputError(f"{path}: activation must be swiglu, gelu or relu")
    if not 1 <= cfg["top_k"] <= cfg["num_ffn_experts"]:
        raise InputError(f"{path}: top_k must be in [1, num_ffn_experts]")
    return cfg


class Expert(torch.nn.Module):
    """y = W2 act(W1 x), or W2 (silu(W1 x) * W3 x) for SwiGLU; torch Linear layout [out, in]."""

    def __init__(self, d_model, d_expert, activation):
        super().__init__()
        self.activation = activation
        self.w1 = torch.nn.Linear(d_model, d_expert, bias=False)
        self.w2 = torch.nn.Linear(d_expert, d_model, bias=False)
        if activation == "swiglu":
            self.w3 = torch.nn.Linear(d_model, d_expert, bias=False)

    def forward(self, x):
        h = self.w1(x)
        if self.activation == "swiglu":
            a = F.silu(h) * self.w3(x)
        elif self.activation == "gelu":
            a = F.gelu(h)  # the exact (erf) form, as moekit
        else:
            a = F.relu(h)
        return self.w2(a)


class MoeLayer(torch.nn.Module):
    """The layer moekit-layer computes. Parameter names match Mixtral's MoE block:
    gate.weight [N_E, D], experts.{i}.w1.weight [d_expert, D], .w2.weight [D, d_expert], .w3.weight."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, n = cfg["d_model"], cfg["num_ffn_experts"]
        self.gate = torch.nn.Linear(d, n, bias=False)
        self.experts = torch.nn.ModuleList(Expert(d, cfg["d_expert"], cfg["activation"]) for _ in range(n))

    def forward(self, x):
        cfg, tokens = self.cfg, x.shape[0]
        n, k = cfg["num_ffn_experts"], cfg["top_k"]
        logits = self.gate(x)  # [T, N_E]
        if cfg["router"] == "softmax":
            score = torch.softmax(logits, dim=-1)
            prob = score  # P of the balance loss
        else:  # DeepSeek-V3: sigmoid scores, picked ones normalised; P uses s / sum(s)
            score = torch.sigmoid(logits)
            prob = score / score.sum(dim=-1, keepdim=True)
        # Ties go to the lower expert index: a stable descending sort (torch.topk does not promise it).
        idx = torch.sort(score.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
        gates = score.gather(1, idx)
        if cfg["router"] == "sigmoid" or cfg["renormalize"]:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        routed = torch.bincount(idx.flatten(), minlength=n)

        # Capacity C = ceil(gamma k T / N_E): each expert keeps its C highest-scoring slots, earlier
        # tokens first on ties; a dropped slot contributes 0 to y.
        keep = torch.ones_like(idx, dtype=torch.bool)
        if cfg["capacity_factor"] > 0:
            cap = math.ceil(cfg["capacity_factor"] * k * tokens / n)
            for e in range(n):
                t, j = (idx == e).nonzero(as_tuple=True)  # in token order
                order = torch.sort(score.detach()[t, e], descending=True, stable=True).indices
                keep[t[order[cap:]], j[order[cap:]]] = False

        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            t, j = ((idx == e) & keep).nonzero(as_tuple=True)
            if t.numel():
                y = y.index_add(0, t, gates[t, j].unsqueeze(-1) * expert(x[t]))

        f = routed.to(x.dtype) / (k * tokens)  # fraction of slots per expert: no gradient
        lbl = n * (f * prob.mean(dim=0)).sum()
        zloss = (torch.logsumexp(logits, dim=-1) ** 2).mean()
        return {"y": y, "logits": logits, "topk.indices": idx.to(torch.int32), "topk.gates": gates,
                "expert.counts": torch.bincount(idx[keep], minlength=n).to(torch.int32),
                "aux.lbl": lbl.reshape(1), "aux.zloss": zloss.reshape(1)}


def mixtral_tensors(block):
    """The weights of a Hugging Face MixtralSparseMoeBlock under moekit-layer's names, as fp32.
    Handles both layouts: per-expert Linear modules (transformers 4.x: experts.{i}.w1/w2/w3.weight) and
    fused experts (5.x: experts.gate_up_proj [N_E, 2 d_expert, D] = [w1; w3], experts.down_proj = w2)."""
    sd = {k: v.detach().float().contiguous() for k, v in block.state_dict().items()}
    if "experts.gate_up_proj" not in sd:
        return sd
    gate_up, down = sd["experts.gate_up_proj"], sd["experts.down_proj"]
    d_expert = gate_up.shape[1] // 2
    out = {"gate.weight": sd["gate.weight"]}
    for i in range(gate_up.shape[0]):
        out[f"experts.{i}.w1.weight"] = gate_up[i, :d_expert].contiguous()
        out[f"experts.{i}.w3.weight"] = gate_up[i, d_expert:].contiguous()
        out[f"experts.{i}.w2.weight"] = down[i].contiguous()
    return out


def make_input(args):
    cfg = load_config(args.config)
    layer = MoeLayer(cfg)  # torch's default Linear init
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for p in layer.parameters():
            bound = 1.0 / math.sqrt(p.shape[1])
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
    tensors = {name: p.detach().float().contiguous() for name, p in layer.state_dict().items()}
    tensors["x"] = torch.randn(args.tokens, cfg["d_model"], generator=g)
    tensors["dy"] = torch.randn(args.tokens, cfg["d_model"], generator=g)
    save_file(tensors, args.input)
    print(f"wrote {args.input}: {len(tensors)} tensors, {args.tokens} tokens")
    return 0


def compare(args):
    cfg = load_config(args.config)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    inp, out = load_file(args.input), load_file(args.output)
    layer = MoeLayer(cfg).to(dtype)
    params = {k: v.to(dtype) for k, v in inp.items() if k not in ("x", "dy")}
    layer.load_state_dict(params, strict=True)  # names and shapes must match exactly
    x = inp["x"].to(dtype).requires_grad_(True)
    r = layer(x)
    loss = (r["y"] * inp["dy"].to(dtype)).sum() + cfg["lbl_coef"] * r["aux.lbl"].sum() \
        + cfg["zloss_coef"] * r["aux.zloss"].sum()
    loss.backward()
    ref = dict(r, dx=x.grad)
    ref.update({"grad." + name: p.grad for name, p in layer.named_parameters()})

    ok = True
    for name in sorted(set(ref) - set(out)):
        print(f"MISSING  {name}")
        ok = False
    for name in sorted(set(out) - set(ref)):
        print(f"EXTRA    {name}")
        ok = False
    for name in sorted(set(ref) & set(out)):
        want, got = ref[name].detach(), out[name]
        if tuple(want.shape) != tuple(got.shape):
            print(f"SHAPE    {name}: expected {tuple(want.shape)}, found {tuple(got.shape)}")
            ok = False
        elif not got.is_floating_point():
            same = torch.equal(got.to(torch.int64), want.to(torch.int64))
            print(f"{'ok' if same else 'DIFFER':8} {name}: exact")
            ok = ok and same
        else:
            err = (got.to(torch.float64) - want.to(torch.float64)).abs().max().item() if got.numel() else 0.0
            scale = want.abs().max().item() if want.numel() else 0.0
            rel = err / scale if scale > 0 else err
            good = rel <= args.rtol
            print(f"{'ok' if good else 'DIFFER':8} {name}: max |diff| / max |ref| = {rel:.2e}")
            ok = ok and good
    if not torch.equal(out.get("topk.indices", torch.zeros(0)).to(torch.int64), ref["topk.indices"].to(torch.int64)):
        print("note: the routing differs; with near-tied router scores fp32 and fp64 may pick different experts,"
              " and every tensor downstream then differs too")
    print("all outputs match" if ok else "some outputs differ")
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-input", help="write a random in.safetensors for a config")
    mk.add_argument("--config", required=True)
    mk.add_argument("--input", required=True, help="the in.safetensors to write")
    mk.add_argument("--tokens", type=int, default=32)
    mk.add_argument("--seed", type=int, default=0)
    cp = sub.add_parser("compare", help="compare moekit-layer's out.safetensors with PyTorch")
    cp.add_argument("--config", required=True)
    cp.add_argument("--input", required=True)
    cp.add_argument("--output", required=True, help="the out.safetensors moekit-layer wrote")
    cp.add_argument("--rtol", type=float, default=1e-4, help="max |diff| / max |ref| allowed per tensor")
    cp.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                    help="precision of the PyTorch reference")
    args = ap.parse_args(argv)
    try:
        return make_input(args) if args.command == "make-input" else compare(args)
    except (InputError, OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"ref_layer.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
