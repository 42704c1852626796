#!/usr/bin/env python3
# Alternates two bench_moe_layer binaries (old main, new main), R rounds, and prints per-row ratios.
import json, subprocess, sys, statistics, os
old, new, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
env = dict(os.environ, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="passive")
res = {"old": [], "new": []}
for r in range(rounds):
    for tag, b in (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old)):
        out = f"/tmp/ab_{tag}_{r}.json"
        subprocess.run([b, "--reps", "3", "--json", out], env=env, check=True, stdout=subprocess.DEVNULL)
        res[tag].append(json.load(open(out))["rows"])
keys = [(x["shape"], x["routing"], x["experts"], x["capacity_factor"], x["tau"]) for x in res["old"][0]]
print(f"{'row':58s} {'fwd new/old':>12s} {'fb new/old':>12s}  (median of {rounds} paired rounds; spread old-vs-old fwd+bwd)")
table = []
for i, k in enumerate(keys):
    rf = [n[i]["fwd_ms"] / o[i]["fwd_ms"] for n, o in zip(res["new"], res["old"])]
    rb = [n[i]["fwd_bwd_ms"] / o[i]["fwd_bwd_ms"] for n, o in zip(res["new"], res["old"])]
    olds = [o[i]["fwd_bwd_ms"] for o in res["old"]]
    spread = max(olds) / min(olds)
    table.append({"row": list(k), "fwd_ratio_new_over_old": statistics.median(rf), "fwd_bwd_ratio_new_over_old": statistics.median(rb),
                  "old_fwd_bwd_max_over_min": spread, "rounds": rounds})
    print(f"{str(k):58s} {statistics.median(rf):12.3f} {statistics.median(rb):12.3f}  old spread {spread:.3f}")
json.dump(table, open("/tmp/ab_result.json", "w"), indent=1)
