#!/usr/bin/env python3
"""Check moekit-layer against the same MoE layer written in PyTorch (see docs/harness.md).

    python tools/ref_layer.py make-input --config cfg.json --tokens 64 --seed 0 --input in.safetensors
    moekit-layer --config cfg.json --input in.safetensors --output out.safetensors
    python tools/ref_layer.py compare --config cfg.json --input in.safetensors --output out.safetensors

`compare` rebuilds the layer as an ordinary torch.nn.Module (Mixtral's parameter names, a loop over the
experts; MoE++'s zero, copy and constant experts and gating residual, arXiv 2410.07348; GPT-OSS's router
bias, expert biases and clamped SwiGLU; DeepSeek-V2/V3's group-limited routing and routed scaling
factor), runs it in float64 on the same inputs, backpropagates
L = sum(y * dy) + lbl_coef * LBL + zloss_coef * zloss, and compares every tensor of out.safetensors.
With "dtype": "bf16" in the config (either backend) it first rounds the inputs the
bf16 layer stores in bf16 (x, dy and every weight but gate_residual.weight and gate.bias) and compares
with a looser default tolerance.
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
DEFAULTS = {"num_zero_experts": 0, "num_copy_experts": 0, "num_constant_experts": 0, "router": "softmax",
            "gating_residual": False, "renormalize": None, "activation": "swiglu", "capacity_factor": 0.0,
            "lbl_coef": 0.0, "zloss_coef": 0.0, "tau": 1.0, "backend": "host", "dtype": "fp32",
            "expert_bias": False, "bias_update_rate": 1e-3, "router_bias": False, "routed_scaling_factor": 1.0,
            "n_group": None, "topk_group": 1, "group_score": "top2_sum", "ffn_bias": False,
            "swiglu_alpha": 1.702, "swiglu_limit": 7.0, "num_shared_experts": 0, "d_shared": 0, "shared_gate": False,
            "balance": "micro_batch", "sequence_length": 0, "routing": "token_choice"}
BIAS = "gate.e_score_correction_bias"  # router::BiasBalanced's selection biases (an input, not a parameter)
REPLAY = "replay.indices"  # router replay's record [T, k] int32, -1 for a slot with no expert (optional input)
ZC_KINDS = ("num_zero_experts", "num_copy_experts", "num_constant_experts")  # after the FFN experts, in order
BACKENDS, DTYPES = ("host", "cuda"), ("fp32", "bf16")
ACTIVATIONS = ("swiglu", "gelu", "relu", "swiglu_oai")
GATED = ("swiglu", "swiglu_oai")  # the activations with an up projection w3
GROUP_SCORES = ("top2_sum", "max")
# Default --rtol by the config's dtype: fp32 moekit agrees with float64 to a few 1e-7; bf16 keeps its
# activations in bf16 (8-bit mantissa, 2^-9 = 2e-3 per rounding, several roundings deep).
DEFAULT_RTOL = {"fp32": 1e-4, "bf16": 2e-2}
# Inputs a bf16 moekit layer keeps in fp32 (everything else it stores rounded to bf16): the terms that
# meet the fp32 logits.
FP32_IN_BF16_LAYER = ("prev_logits", "gate_residual.weight", "gate.bias")


class InputError(Exception):
    """A bad argument, config or file: reported with exit code 2."""


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not 1, as for moekit-layer


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    given, cfg = set(cfg), {**DEFAULTS, **cfg}
    if cfg["router"] not in ("softmax", "sigmoid"):
        raise InputError(f"{path}: router must be softmax or sigmoid")
    if cfg["activation"] not in ACTIVATIONS:
        raise InputError(f"{path}: activation must be one of {', '.join(ACTIVATIONS)}")
    for key in ZC_KINDS:
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 0:
            raise InputError(f"{path}: {key} must be an integer >= 0")
    for key in ("gating_residual", "expert_bias", "router_bias", "ffn_bias", "shared_gate"):
        if not isinstance(cfg[key], bool):
            raise InputError(f"{path}: {key} must be true or false")
    if cfg["renormalize"] is not None and not isinstance(cfg["renormalize"], bool):
        raise InputError(f"{path}: renormalize must be true, false or null")
    rate = cfg["bias_update_rate"]
    if not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0:
        raise InputError(f"{path}: bias_update_rate must be a finite number >= 0")
    if not isinstance(cfg["tau"], (int, float)) or not math.isfinite(cfg["tau"]) or cfg["tau"] <= 0:
        raise InputError(f"{path}: tau must be a finite number > 0")
    if cfg["backend"] not in BACKENDS:
        raise InputError(f"{path}: backend must be one of {', '.join(BACKENDS)}")
    if cfg["dtype"] not in DTYPES:
        raise InputError(f"{path}: dtype must be one of {', '.join(DTYPES)}")
    if not 1 <= cfg["top_k"] <= num_experts(cfg):
        raise InputError(f"{path}: top_k must be in [1, number of experts = {num_experts(cfg)}]")
    for key in ("routed_scaling_factor", "swiglu_alpha", "swiglu_limit"):
        if not is_number(cfg[key]) or cfg[key] <= 0:
            raise InputError(f"{path}: {key} must be a finite number > 0")
    # Options of a policy the config does not ask for are an error, as in moekit-layer (not silently unused).
    if cfg["activation"] != "swiglu_oai":
        for key in ("swiglu_alpha", "swiglu_limit"):
            if key in given:
                raise InputError(f"{path}: {key} needs \"activation\": \"swiglu_oai\"")
    for key in ("num_shared_experts", "d_shared"):
        if not is_int(cfg[key]) or cfg[key] < 0:
            raise InputError(f"{path}: {key} must be an integer >= 0")
    if cfg["num_shared_experts"] == 0:
        for key in ("d_shared", "shared_gate"):
            if cfg[key]:
                raise InputError(f"{path}: {key} needs num_shared_experts > 0")
    if cfg["balance"] not in ("micro_batch", "sequence"):
        raise InputError(f"{path}: balance must be micro_batch or sequence")
    if not is_int(cfg["sequence_length"]) or cfg["sequence_length"] < 0:
        raise InputError(f"{path}: sequence_length must be an integer >= 0")
    if (cfg["balance"] == "sequence") != (cfg["sequence_length"] > 0):
        raise InputError(f"{path}: sequence_length (>= 1) goes with \"balance\": \"sequence\", and only with it")
    if cfg["routing"] not in ("token_choice", "expert_choice"):
        raise InputError(f"{path}: routing must be token_choice or expert_choice")
    if cfg["routing"] == "expert_choice":  # the experts choose: moekit-layer's rules (router/expert_choice.hpp)
        if cfg["router"] != "softmax" or cfg["capacity_factor"] <= 0 or cfg["lbl_coef"] > 0 or cfg["renormalize"] \
                or cfg["expert_bias"] or "n_group" in given or cfg["balance"] != "micro_batch":
            raise InputError(f"{path}: expert_choice needs the softmax router, capacity_factor > 0, lbl_coef 0, "
                             "and no renormalize, expert_bias, n_group or sequence balance")
    if "n_group" not in given:
        for key in ("topk_group", "group_score"):
            if key in given:
                raise InputError(f"{path}: {key} needs n_group (group-limited routing)")
    else:
        check_groups(path, cfg)
    return cfg


def check_groups(path, cfg):
    """Group-limited routing's rules, those of moekit's router::GroupLimited."""
    n, n_group, topk_group = num_experts(cfg), cfg["n_group"], cfg["topk_group"]
    if not is_int(n_group) or n_group < 1:
        raise InputError(f"{path}: n_group must be an integer >= 1")
    if not is_int(topk_group) or not 1 <= topk_group <= n_group:
        raise InputError(f"{path}: topk_group must be an integer in [1, n_group = {n_group}]")
    if cfg["group_score"] not in GROUP_SCORES:
        raise InputError(f"{path}: group_score must be one of {', '.join(GROUP_SCORES)}")
    if n % n_group:
        raise InputError(f"{path}: n_group = {n_group} must divide the number of experts {n} (equal groups)")
    if cfg["top_k"] > topk_group * (n // n_group):
        raise InputError(f"{path}: top_k must be <= topk_group * experts per group = {topk_group * (n // n_group)}")
    if cfg["group_score"] == "top2_sum" and n // n_group < 2:
        raise InputError(f"{path}: group_score top2_sum needs at least 2 experts per group")


def num_experts(cfg):
    """N_E: every expert; logits, indices and counts are ordered FFN, zero, copy, constant."""
    return cfg["num_ffn_experts"] + sum(cfg[k] for k in ZC_KINDS)


class Expert(torch.nn.Module):
    """y = W2 act(W1 x), or W2 (silu(W1 x) * W3 x) for SwiGLU; torch Linear layout [out, in].
    With cfg["ffn_bias"] (GPT-OSS) every projection has a bias: w1.bias, w3.bias [d_expert], w2.bias [D]."""

    def __init__(self, cfg):
        super().__init__()
        self.activation, self.alpha, self.limit = cfg["activation"], cfg["swiglu_alpha"], cfg["swiglu_limit"]
        d_model, d_expert, bias = cfg["d_model"], cfg["d_expert"], cfg["ffn_bias"]
        self.w1 = torch.nn.Linear(d_model, d_expert, bias=bias)
        self.w2 = torch.nn.Linear(d_expert, d_model, bias=bias)
        if self.activation in GATED:
            self.w3 = torch.nn.Linear(d_model, d_expert, bias=bias)

    def forward(self, x):
        h = self.w1(x)
        if self.activation == "swiglu":
            a = F.silu(h) * self.w3(x)
        elif self.activation == "swiglu_oai":  # GPT-OSS: w1 the gate, w3 the up projection
            # g = min(h1, limit), u = clamp(h3, -limit, limit), as transformers' GptOssExperts: torch.clamp
            # with number bounds passes no gradient on a bound (torch 2.15), and neither does moekit.
            lim, h3 = self.limit, self.w3(x)
            g = h.clamp(max=lim)
            u = h3.clamp(min=-lim, max=lim)
            a = (u + 1) * g * torch.sigmoid(self.alpha * g)
        elif self.activation == "gelu":
            a = F.gelu(h)  # the exact (erf) form, as moekit
        else:
            a = F.relu(h)
        return self.w2(a)


class SharedExperts(torch.nn.Module):
    """DeepSeek's / Qwen2-MoE's shared experts: n experts of width d_shared (0: d_expert) as one SwiGLU FFN,
    w1, w3 [n d_shared, D], w2 [D, n d_shared], every token through it (as transformers' DeepseekV3MLP)."""

    def __init__(self, cfg):
        super().__init__()
        d, width = cfg["d_model"], cfg["num_shared_experts"] * (cfg["d_shared"] or cfg["d_expert"])
        self.w1 = torch.nn.Linear(d, width, bias=False)
        self.w2 = torch.nn.Linear(width, d, bias=False)
        self.w3 = torch.nn.Linear(d, width, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ConstantExpert(torch.nn.Module):
    """MoE++ constant expert: E(x) = a1 x + a2 v with [a1, a2] = softmax(Wc x); wc.weight [2, D], v [D]."""

    def __init__(self, d_model):
        super().__init__()
        self.wc = torch.nn.Linear(d_model, 2, bias=False)
        self.v = torch.nn.Parameter(torch.zeros(d_model))

    def forward(self, x):
        a = torch.softmax(self.wc(x), dim=-1)
        return a[:, :1] * x + a[:, 1:] * self.v


class MoeLayer(torch.nn.Module):
    """The layer moekit-layer computes. Parameter names match Mixtral's MoE block:
    gate.weight [N_E, D], experts.{i}.w1.weight [d_expert, D], .w2.weight [D, d_expert], .w3.weight;
    MoE++'s: constant.{j}.wc.weight [2, D], constant.{j}.v [D], gate_residual.weight [N_E, N_E];
    GPT-OSS's: gate.bias [N_E] (router_bias), experts.{i}.w1/w3.bias [d_expert], .w2.bias [D] (ffn_bias);
    shared experts': shared_experts.w1/w2/w3.weight, shared_expert_gate.weight [1, D] (shared_gate).
    Zero and copy experts have no parameters."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, n = cfg["d_model"], num_experts(cfg)
        self.gate = torch.nn.Linear(d, n, bias=cfg["router_bias"])  # GPT-OSS: logits = W x + b
        self.experts = torch.nn.ModuleList(Expert(cfg) for _ in range(cfg["num_ffn_experts"]))
        self.constant = torch.nn.ModuleList(ConstantExpert(d) for _ in range(cfg["num_constant_experts"]))
        if cfg["gating_residual"]:  # logits = W x + W_g prev_logits
            self.gate_residual = torch.nn.Linear(n, n, bias=False)
        if cfg["num_shared_experts"] > 0:  # y += sigma(w_sg x) * shared(x) (Qwen2-MoE), or shared(x) (DeepSeek)
            self.shared_experts = SharedExperts(cfg)
            if cfg["shared_gate"]:
                self.shared_expert_gate = torch.nn.Linear(d, 1, bias=False)

    def expert_kinds(self):
        """(first index, kind) of each expert, in the order of the logits."""
        cfg = self.cfg
        kinds = ["ffn"] * cfg["num_ffn_experts"] + ["zero"] * cfg["num_zero_experts"] \
            + ["copy"] * cfg["num_copy_experts"] + ["constant"] * cfg["num_constant_experts"]
        return list(enumerate(kinds))

    def forward(self, x, prev_logits=None, bias=None, replay=None):
        cfg, tokens = self.cfg, x.shape[0]
        n, k, n_ffn = num_experts(cfg), cfg["top_k"], cfg["num_ffn_experts"]
        logits = self.gate(x)  # [T, N_E]
        if cfg["gating_residual"]:
            logits = logits + self.gate_residual(prev_logits)
        if cfg["router"] == "softmax":
            score = torch.softmax(logits, dim=-1)
            prob = score  # P of the balance loss
        else:  # DeepSeek-V3: sigmoid scores; P uses s / sum(s)
            score = torch.sigmoid(logits)
            prob = score / score.sum(dim=-1, keepdim=True)
        if cfg["routing"] == "expert_choice":
            return self.expert_choice(x, logits, score)
        # Ties go to the lower expert index: a stable descending sort (torch.topk does not promise it).
        # With expert_bias (DeepSeek-V3) the selection ranks score + bias; the gates use the score alone.
        chosen = score.detach() if bias is None else score.detach() + bias
        if cfg["n_group"] is not None:  # the groups are scored on the same selection scores (s + b)
            chosen = best_groups_only(chosen, cfg["n_group"], cfg["topk_group"], cfg["group_score"])
        idx = torch.sort(chosen, dim=-1, descending=True, stable=True).indices[:, :k]
        if replay is not None:  # router replay: the record's experts; a -1 slot has none (gate 0, not counted)
            idx = replay.to(torch.int64)
        has = idx >= 0
        gates = score.gather(1, idx.clamp(min=0)) * has
        # renormalize null / absent: the router's default (sigmoid yes, softmax no), as moekit's; either
        # way for either score function when given. The scaling factor comes after the normalisation.
        renorm = cfg["router"] == "sigmoid" if cfg["renormalize"] is None else cfg["renormalize"]
        if renorm:  # a replayed token without experts keeps its zero gates (no 0 / 0)
            total = gates.sum(dim=-1, keepdim=True)
            gates = gates / torch.where(total > 0, total, torch.ones_like(total))
        gates = gates * cfg["routed_scaling_factor"]
        routed = torch.bincount(idx[has], minlength=n)

        # Capacity: each expert keeps its C highest-scoring slots, earlier tokens first on ties; a
        # dropped slot contributes 0 to y. C = ceil(gamma k T / N_E), or with N_ZC zero-computation
        # experts MoE++'s C_FFN = ceil(gamma tau k T / (tau N_FFN + N_ZC)), C_ZC = ceil(gamma k T / (...)).
        gamma, tau, n_zc = cfg["capacity_factor"], cfg["tau"], n - n_ffn
        keep = has.clone()
        if gamma > 0:
            if n_zc == 0:
                cap_ffn = cap_zc = math.ceil(gamma * k * tokens / n)
            else:
                cap_ffn = math.ceil(gamma * tau * k * tokens / (tau * n_ffn + n_zc))
                cap_zc = math.ceil(gamma * k * tokens / (tau * n_ffn + n_zc))
            for e in range(n):
                cap = cap_ffn if e < n_ffn else cap_zc
                t, j = (idx == e).nonzero(as_tuple=True)  # in token order
                order = torch.sort(score.detach()[t, e], descending=True, stable=True).indices
                keep[t[order[cap:]], j[order[cap:]]] = False

        y = torch.zeros_like(x)
        for e, kind in self.expert_kinds():
            t, j = ((idx == e) & keep).nonzero(as_tuple=True)
            if not t.numel() or kind == "zero":  # zero expert: E(x) = 0
                continue
            if kind == "ffn":
                out = self.experts[e](x[t])
            elif kind == "copy":  # E(x) = x
                out = x[t]
            else:
                out = self.constant[e - (n - cfg["num_constant_experts"])](x[t])
            y = y.index_add(0, t, gates[t, j].unsqueeze(-1) * out)
        if cfg["num_shared_experts"] > 0:  # never scaled by routed_scaling_factor
            shared = self.shared_experts(x)
            if cfg["shared_gate"]:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared

        # MoE++'s heterogeneous LBL: eta_i = 1 for FFN experts, tau for the others (Switch's when tau = 1).
        eta = torch.tensor([1.0] * n_ffn + [tau] * n_zc, dtype=x.dtype)
        if cfg["balance"] == "sequence":  # DeepSeek-V3: f and P per sequence of S tokens, averaged over them
            s = cfg["sequence_length"]
            if tokens % s:
                raise InputError(f"sequence_length {s} does not divide the {tokens} tokens")
            seq = idx.reshape(tokens // s, s * k)
            f = torch.stack([torch.bincount(r[r >= 0], minlength=n) for r in seq]).to(x.dtype) / (k * s)
            lbl = n * (eta * f * prob.reshape(tokens // s, s, n).mean(dim=1)).sum(dim=1).mean()
        else:
            f = routed.to(x.dtype) / (k * tokens)  # fraction of slots per expert: no gradient
            lbl = n * (eta * f * prob.mean(dim=0)).sum()
        zloss = (torch.logsumexp(logits, dim=-1) ** 2).mean()
        out = {"y": y, "logits": logits, "topk.indices": idx.to(torch.int32), "topk.gates": gates,
               "expert.counts": torch.bincount(idx[keep], minlength=n).to(torch.int32),
               "aux.lbl": lbl.reshape(1), "aux.zloss": zloss.reshape(1)}
        if bias is not None:  # u * sign(mean - c_i) of this forward's routed counts
            mean = routed.sum().to(torch.float64) / n
            out["expert_bias.update"] = (torch.sign(mean - routed.to(torch.float64)) * cfg["bias_update_rate"]).to(x.dtype)
        return out


    def expert_choice(self, x, logits, score):
        """Zhou et al. (arXiv 2202.09368): expert e takes the C_e tokens with the largest softmax score
        (a stable descending sort over the tokens: ties to the lower token), C_e the capacity of its kind
        capped at T; y_t = sum over the experts that took t of c * p[t, e] * E_e(x_t)."""
        cfg, tokens = self.cfg, x.shape[0]
        n, k, n_ffn = num_experts(cfg), cfg["top_k"], cfg["num_ffn_experts"]
        gamma, tau, n_zc = cfg["capacity_factor"], cfg["tau"], n - n_ffn
        if n_zc == 0:
            cap_ffn = cap_zc = math.ceil(gamma * k * tokens / n)
        else:
            cap_ffn = math.ceil(gamma * tau * k * tokens / (tau * n_ffn + n_zc))
            cap_zc = math.ceil(gamma * k * tokens / (tau * n_ffn + n_zc))
        taken = torch.zeros(tokens, n, dtype=torch.bool)
        for e in range(n):
            cap = min(cap_ffn if e < n_ffn else cap_zc, tokens)
            taken[torch.sort(score.detach()[:, e], descending=True, stable=True).indices[:cap], e] = True
        gates = score * cfg["routed_scaling_factor"] * taken
        y = torch.zeros_like(x)
        for e, kind in self.expert_kinds():
            t = taken[:, e].nonzero(as_tuple=True)[0]
            if not t.numel() or kind == "zero":
                continue
            if kind == "ffn":
                out = self.experts[e](x[t])
            elif kind == "copy":
                out = x[t]
            else:
                out = self.constant[e - (n - cfg["num_constant_experts"])](x[t])
            y = y.index_add(0, t, gates[t, e].unsqueeze(-1) * out)
        if cfg["num_shared_experts"] > 0:
            shared = self.shared_experts(x)
            if cfg["shared_gate"]:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        counts = taken.sum(dim=0)
        eta = torch.tensor([1.0] * n_ffn + [tau] * n_zc, dtype=x.dtype)
        lbl = n * (eta * counts.to(x.dtype) / (k * tokens) * score.mean(dim=0)).sum()  # reported; lbl_coef is 0
        zloss = (torch.logsumexp(logits, dim=-1) ** 2).mean()
        return {"y": y, "logits": logits, "choice.taken": taken.to(torch.int32), "choice.gates": gates,
                "expert.counts": counts.to(torch.int32), "aux.lbl": lbl.reshape(1), "aux.zloss": zloss.reshape(1)}


def best_groups_only(sel, n_group, topk_group, how):
    """Group-limited routing (DeepSeek-V2 "max", V3 "top2_sum"): sel [T, N_E] with the experts outside
    each token's topk_group best groups (contiguous, N_E / n_group each) set to -inf, so that the top-k
    is taken inside them. Ties between groups go to the lower group, as moekit's router::GroupLimited."""
    tokens, n = sel.shape
    size = n // n_group
    top = sel.reshape(tokens, n_group, size).topk(2 if how == "top2_sum" else 1, dim=-1).values  # values: ties moot
    best = torch.sort(top.sum(dim=-1), dim=-1, descending=True, stable=True).indices[:, :topk_group]
    kept = torch.zeros(tokens, n_group, dtype=torch.bool).scatter(1, best, True)
    return sel.masked_fill(~kept.repeat_interleave(size, dim=1), -math.inf)


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
        for name, p in layer.named_parameters():
            # U(-1/sqrt(fan_in), 1/sqrt(fan_in)); a Linear's bias by its weight's fan_in, as torch and moekit
            owner = layer.get_submodule(name.rpartition(".")[0])
            fan_in = owner.in_features if isinstance(owner, torch.nn.Linear) else p.shape[-1]
            bound = 1.0 / math.sqrt(fan_in)
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
    tensors = {name: p.detach().float().contiguous() for name, p in layer.state_dict().items()}
    tensors["x"] = torch.randn(args.tokens, cfg["d_model"], generator=g)
    tensors["dy"] = torch.randn(args.tokens, cfg["d_model"], generator=g)
    if cfg["gating_residual"]:  # stands in for the previous MoE layer's logits
        tensors["prev_logits"] = torch.randn(args.tokens, num_experts(cfg), generator=g)
    if cfg["expert_bias"]:  # biases at the scale of the scores, so that they change some selections
        tensors[BIAS] = 0.3 * torch.randn(num_experts(cfg), generator=g)
    if args.replay:  # a record from elsewhere (a rollout engine): k distinct experts per token, about 1 in 5 slots -1
        n, k = num_experts(cfg), cfg["top_k"]
        rec = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(args.tokens)]).to(torch.int32)
        rec[torch.rand(rec.shape, generator=g) < 0.2] = -1
        tensors[REPLAY] = rec
    save_file(tensors, args.input)
    print(f"wrote {args.input}: {len(tensors)} tensors, {args.tokens} tokens")
    return 0


def compare(args):
    cfg = load_config(args.config)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    inp, out = load_file(args.input), load_file(args.output)
    rtol = args.rtol if args.rtol is not None else DEFAULT_RTOL[cfg["dtype"]]
    if cfg["dtype"] == "bf16":  # what the bf16 layer computed on: round to nearest even, as moekit-layer does
        inp = {k: v if k in FP32_IN_BF16_LAYER + (BIAS, REPLAY) else v.to(torch.bfloat16).to(v.dtype) for k, v in inp.items()}
    layer = MoeLayer(cfg).to(dtype)
    data = ("x", "dy", "prev_logits", BIAS, REPLAY)
    params = {k: v.to(dtype) for k, v in inp.items() if k not in data}
    layer.load_state_dict(params, strict=True)  # names and shapes must match exactly
    x = inp["x"].to(dtype).requires_grad_(True)
    prev = inp["prev_logits"].to(dtype).requires_grad_(True) if cfg["gating_residual"] else None
    bias = inp[BIAS].to(dtype) if cfg["expert_bias"] else None
    replay = inp.get(REPLAY)
    if replay is not None and cfg["routing"] == "expert_choice":
        raise InputError(f"{args.input}: {REPLAY} replays a token-choice selection; the config asks for expert choice")
    r = layer(x, prev, bias, replay)
    loss = (r["y"] * inp["dy"].to(dtype)).sum() + cfg["lbl_coef"] * r["aux.lbl"].sum() \
        + cfg["zloss_coef"] * r["aux.zloss"].sum()
    loss.backward()
    ref = dict(r, dx=x.grad)
    if prev is not None:
        ref["grad.prev_logits"] = prev.grad
    # An expert no token reached has no .grad in torch; moekit writes its zero gradient.
    ref.update({"grad." + name: torch.zeros_like(p) if p.grad is None else p.grad
                for name, p in layer.named_parameters()})

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
            good = rel <= rtol
            print(f"{'ok' if good else 'DIFFER':8} {name}: max |diff| / max |ref| = {rel:.2e}")
            ok = ok and good
    route = "topk.indices" if "topk.indices" in ref else "choice.taken"
    if not torch.equal(out.get(route, torch.zeros(0)).to(torch.int64), ref[route].to(torch.int64)):
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
    mk.add_argument("--replay", action="store_true", help="add a random router-replay record, replay.indices")
    cp = sub.add_parser("compare", help="compare moekit-layer's out.safetensors with PyTorch")
    cp.add_argument("--config", required=True)
    cp.add_argument("--input", required=True)
    cp.add_argument("--output", required=True, help="the out.safetensors moekit-layer wrote")
    cp.add_argument("--rtol", type=float, default=None,
                    help="max |diff| / max |ref| allowed per tensor (default: 1e-4; 2e-2 for a bf16 config)")
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
