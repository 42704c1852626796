#!/usr/bin/env python3
"""Markdown tables from the train_domains --json files that run.sh writes (stdlib only).

    python3 tools/repro/tables.py [results dir]     default: tools/repro/results
Also writes results/granularity.dat for plot_granularity.gp.
"""
import json
import math
import os
import sys

DIR = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results")
DOMAINS = ["markov", "arith", "copy", "bracket"]
SEEDS_A = (1234, 99, 7, 2024)
SEEDS_B = (1234, 99)


def final(name):
    path = os.path.join(DIR, name + ".jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for line in f:
            j = json.loads(line)
            if j["type"] == "final":
                return j
    return None


def mean_sd(xs):
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def section_a():
    rows, by_scope = [], {"micro": [], "global": []}
    for seed in SEEDS_A:
        for scope in ("micro", "global"):
            j = final(f"a_{scope}_s{seed}")
            if not j:
                continue
            by_scope[scope].append(j)
            d = j["domains"]
            rows.append([scope, seed, f"{j['heldout_loss']:.4f}"] + [f"{d[x]['loss']:.3f}" for x in DOMAINS] +
                        [f"{j['mean_top_share']:.3f}", f"{j['mean_mutual_information_bits']:.3f}",
                         f"{j['mean_normalised_mi']:.3f}", f"{j['tokens_per_s']:.0f}"])
    print("### (a) global- vs micro-batch balance (--pack-by-domain --accum 4, 600 steps)\n")
    print(table(["balance", "seed", "held-out loss"] + DOMAINS +
                ["top-expert share", "MI (bits)", "MI / H(domain)", "tokens/s"], rows))
    summary = []
    for scope, js in by_scope.items():
        if js:
            l = mean_sd([j["heldout_loss"] for j in js])
            t = mean_sd([j["mean_top_share"] for j in js])
            m = mean_sd([j["mean_mutual_information_bits"] for j in js])
            summary.append([scope, len(js), f"{l[0]:.4f} ± {l[1]:.4f}", f"{t[0]:.3f} ± {t[1]:.3f}", f"{m[0]:.3f} ± {m[1]:.3f}"])
    print("\nMean ± sd over seeds:\n")
    print(table(["balance", "seeds", "held-out loss", "top-expert share", "MI (bits)"], summary))
    # Per-layer routing of one seed, to show where specialisation appears.
    for scope in ("micro", "global"):
        j = final(f"a_{scope}_s1234")
        if not j:
            continue
        print(f"\nRouting of `{scope}`, seed 1234 (% of each domain's slots per expert):\n")
        for l, layer in enumerate(j["routing"]):
            n = len(layer[0])
            rows = []
            for d, counts in zip(DOMAINS, layer):
                tot = max(1, sum(counts))
                rows.append([d] + [f"{100 * c / tot:.0f}" for c in counts])
            print(table([f"layer {l}"] + [f"e{e}" for e in range(n)], rows) + "\n")


def section_b():
    rows = []
    variants = (("b_ffn8", None), ("b_moepp_tau1.0", 1.0), ("b_moepp_tau0.75", 0.75), ("b_moepp_tau0.1", 0.1))
    for seed in SEEDS_B:
        base = final(f"b_ffn8_s{seed}")
        for name, tau in variants:
            j = final(f"{name}_s{seed}")
            if not j:
                continue
            c = j["config"]
            n_ffn, n_zc = c["ffn_experts"], c["zero_experts"] + c["copy_experts"] + c["constant_experts"]
            ratio = j["expert_gemm_flops_per_token"] / j["expert_gemm_flops_per_token_ffn_only"]
            pred = (tau * n_ffn / (tau * n_ffn + n_zc)) if tau is not None else 1.0
            label = "8 FFN" if tau is None else f"8 FFN + 1Z 1C 2K, tau {tau}"
            zc = j["zc_slot_share_by_domain"]
            rows.append([label, seed, f"{j['heldout_loss']:.4f}",
                         f"{j['heldout_loss'] - base['heldout_loss']:+.4f}" if base else "",
                         f"{100 * j['zc_slot_share']:.1f}",
                         " / ".join(f"{100 * zc[x]:.0f}" for x in DOMAINS),
                         f"{j['expert_gemm_flops_per_token']:.0f}", f"{ratio:.3f}", f"{pred:.3f}",
                         f"{j['tokens_per_s']:.0f}"])
    print("### (b) MoE++ zero-computation experts (top-2, 1500 steps x 512 tokens)\n")
    print(table(["experts", "seed", "held-out loss", "Δ vs 8 FFN", "ZC slots %", "ZC % markov/arith/copy/bracket",
                 "expert GEMM FLOPs/token", "FLOPs ratio (measured)", "tau·N_FFN/(tau·N_FFN+N_ZC)", "tokens/s"], rows))


def section_c():
    rows, dat = [], []
    for g in (1, 2, 4, 8):
        j = final(f"c_G{g}")
        if not j:
            continue
        c = j["config"]
        rows.append([g, c["ffn_experts"], c["d_expert"], c["top_k"], c["parameters"], f"{j['heldout_loss']:.4f}",
                     f"{j['expert_gemm_flops_per_token']:.0f}", f"{j['tokens_per_s']:.0f}",
                     f"{1000 * c['batch'] / j['tokens_per_s']:.1f}", f"{j['mean_normalised_mi']:.3f}"])
        dat.append(f"{g} {j['heldout_loss']:.5f} {j['tokens_per_s']:.1f}")
    print("### (c) granularity (d_ff 128, E 8, k_base 2; 1500 steps x 512 tokens)\n")
    print(table(["G", "FFN experts", "d_expert", "top-k", "parameters", "held-out loss", "expert GEMM FLOPs/token",
                 "tokens/s", "ms/step", "MI / H(domain)"], rows))
    with open(os.path.join(DIR, "granularity.dat"), "w") as f:
        f.write("# G heldout_loss tokens_per_s\n" + "\n".join(dat) + "\n")


for s in (section_a, section_b, section_c):
    s()
    print()
