#!/usr/bin/env python3
"""moekit's host layer against the PyTorch eager MoE block, in one run: forward and forward+backward
on bench_moe_layer's host shapes, fp32 and bf16, the same threads, rounds alternated so drift on a
shared machine hits every variant alike. Prints a table with the ratios (PyTorch time / moekit time)
and writes JSON.

  python3 bench/torch_peer/compare.py --bench build/release/bench/bench_moe_layer \\
      --torch /tmp/torch-peer/venv/bin/python:pypi [--torch /usr/bin/python3:debian] \\
      [--threads 2] [--reps 5] [--rounds 2] [--dtype fp32 --dtype bf16] [--quick] [--json out.json]

--torch PYTHON:LABEL is an interpreter that imports torch (a throwaway venv: bench/torch_peer/setup_venv.sh;
Debian's python3-torch). A venv's NVIDIA wheels (the libraries a PyPI torch loads at import) are put
on LD_LIBRARY_PATH for it.
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def torch_env(python, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    prefix = os.path.dirname(os.path.dirname(os.path.abspath(python)))
    libs = sorted(glob.glob(os.path.join(prefix, "lib", "python3*", "site-packages", "nvidia", "*", "lib")))
    if libs:
        env["LD_LIBRARY_PATH"] = ":".join(libs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    return env


def run_json(cmd, env):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        path = fh.name
    try:
        subprocess.run(cmd + ["--json", path], env=env, check=True, stdout=subprocess.DEVNULL)
        with open(path) as fh:
            return json.load(fh)
    finally:
        os.unlink(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", required=True, help="bench_moe_layer")
    ap.add_argument("--torch", action="append", default=[], help="PYTHON:LABEL (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", action="append", choices=["fp32", "bf16"])
    ap.add_argument("--quick", action="store_true", help="the tiny shape, one rep (smoke test)")
    ap.add_argument("--json")
    a = ap.parse_args()
    dtypes = a.dtype or ["fp32", "bf16"]
    shapes = ["quick"] if a.quick else ["cpu-mixtral-mini", "cpu-fine"]
    reps = 1 if a.quick else a.reps
    peers = []
    for spec in a.torch:
        python, _, label = spec.partition(":")
        peers.append((label or python, python))
    moekit_env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), OMP_WAIT_POLICY="passive")

    # times[(variant, shape, dtype)] = {"fwd": [...], "fb": [...]} over the rounds
    times, meta = {}, {}
    def add(variant, shape, dtype, fwd, fb):
        t = times.setdefault((variant, shape, dtype), {"fwd": [], "fb": []})
        t["fwd"].append(fwd)
        t["fb"].append(fb)

    for r in range(a.rounds):
        variants = [("moekit", None)] + peers
        if r % 2:
            variants = variants[::-1]
        for dtype in dtypes:
            for label, python in variants:
                if python is None:
                    cmd = [a.bench, "--uniform-only", "--dtype", dtype, "--reps", str(reps)] + (["--quick"] if a.quick else [])
                    out = run_json(cmd, moekit_env)
                    meta["moekit"] = {k: out.get(k) for k in ("machine", "gemm_library", "bf16_gemm", "threads", "command")}
                    for row in out["rows"]:
                        if row["shape"] in shapes and row["dtype"] == dtype:
                            add("moekit", row["shape"], dtype, row["fwd_ms"], row["fwd_bwd_ms"])
                else:
                    cmd = [python, os.path.join(HERE, "torch_moe_block.py"), "--threads", str(a.threads), "--dtype", dtype,
                           "--reps", str(reps)] + sum((["--shape", s] for s in shapes), [])
                    out = run_json(cmd, torch_env(python, a.threads))
                    meta[label] = {"torch": out["torch"], "threads": out["threads"], "python": out["python"]}
                    for row in out["rows"]:
                        add(label, row["shape"], dtype, row["fwd_ms"], row["fwd_bwd_ms"])

    med = {k: {p: statistics.median(v[p]) for p in v} for k, v in times.items()}
    print(f"moekit vs PyTorch eager MoE block | {a.threads} threads | {a.rounds} rounds alternated, median of {reps} reps each")
    for label, m in meta.items():
        print(f"  {label}: {m}")
    head = f"{'shape':17} {'dtype':5} | {'moekit fwd':>10} {'f+b':>8}"
    for label, _ in peers:
        head += f" | {label + ' fwd':>12} {'f+b':>8} {'x fwd':>6} {'x f+b':>6}"
    print(head)
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            mk = med.get(("moekit", shape, dtype))
            if not mk:
                continue
            line = f"{shape:17} {dtype:5} | {mk['fwd']:10.1f} {mk['fb']:8.1f}"
            row = {"shape": shape, "dtype": dtype, "moekit_fwd_ms": mk["fwd"], "moekit_fwd_bwd_ms": mk["fb"], "peers": {}}
            for label, _ in peers:
                t = med[(label, shape, dtype)]
                line += f" | {t['fwd']:12.1f} {t['fb']:8.1f} {t['fwd'] / mk['fwd']:6.2f} {t['fb'] / mk['fb']:6.2f}"
                row["peers"][label] = {"fwd_ms": t["fwd"], "fwd_bwd_ms": t["fb"], "speedup_fwd": t["fwd"] / mk["fwd"],
                                       "speedup_fwd_bwd": t["fb"] / mk["fb"]}
            print(line)
            rows.append(row)
    print("x: PyTorch's time / moekit's (above 1: moekit is faster)")
    if a.json:
        with open("/proc/loadavg") as fh:
            load = " ".join(fh.read().split()[:3])
        with open(a.json, "w") as fh:
            json.dump({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "threads": a.threads, "rounds": a.rounds,
                       "reps": reps, "loadavg_at_end": load, "variants": meta, "rows": rows,
                       "all_times": [{"variant": k[0], "shape": k[1], "dtype": k[2], **v} for k, v in times.items()]}, fh, indent=1)


if __name__ == "__main__":
    main()
