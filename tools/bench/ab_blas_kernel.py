#!/usr/bin/env python3
# Alternates bench_moe_layer with OpenBLAS's generic fallback kernel forced (MOEKIT_BLAS_CORETYPE=Prescott) and with the
# kernel gemm_library() selects, R rounds; prints per-row medians and writes /tmp/abenv.json. Usage: ab_blas_kernel.py R
import json, subprocess, os, statistics, sys
b = "build/cpu/bench/bench_moe_layer"; rounds = int(sys.argv[1])
res = {"auto": [], "Prescott": []}
for r in range(rounds):
    for tag in (("auto", "Prescott") if r % 2 == 0 else ("Prescott", "auto")):
        env = dict(os.environ, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="passive")
        if tag == "Prescott": env["MOEKIT_BLAS_CORETYPE"] = "Prescott"
        out = f"/tmp/abenv_{tag}_{r}.json"
        subprocess.run([b, "--reps", "3", "--json", out], env=env, check=True, stdout=subprocess.DEVNULL)
        res[tag].append(json.load(open(out)))
print("gemm_library auto:", res["auto"][0]["gemm_library"]); print("gemm_library forced:", res["Prescott"][0]["gemm_library"])
rows = []
for i, x in enumerate(res["auto"][0]["rows"]):
    k = (x["shape"], x["routing"], x["experts"], x["capacity_factor"], x["tau"])
    fa = statistics.median(a["rows"][i]["fwd_ms"] for a in res["auto"]); fp = statistics.median(p["rows"][i]["fwd_ms"] for p in res["Prescott"])
    ba = statistics.median(a["rows"][i]["fwd_bwd_ms"] for a in res["auto"]); bp = statistics.median(p["rows"][i]["fwd_bwd_ms"] for p in res["Prescott"])
    ra = statistics.median(a["rows"][i]["fwd_bwd_ratio"] for a in res["auto"]) if "fwd_bwd_ratio" in x else None
    rows.append({"row": list(k), "fwd_ms_auto": fa, "fwd_ms_prescott": fp, "fwd_bwd_ms_auto": ba, "fwd_bwd_ms_prescott": bp, "speedup_fwd_bwd": bp / ba})
    print(f"{str(k):58s} fwd {fp:8.1f} -> {fa:7.1f} ms  fwd+bwd {bp:8.1f} -> {ba:7.1f} ms  ({bp/ba:.2f}x)")
json.dump(rows, open("/tmp/abenv.json", "w"), indent=1)
