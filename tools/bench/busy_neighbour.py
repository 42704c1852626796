#!/usr/bin/env python3
# train_domains' speed alone and beside one busy process (a shell busy loop), alternated over rounds:
# tokens/s from the final JSON line of `--steps N` runs, and the ratio busy / alone (the target
# is >= 0.4 on 2 cores; 0.5 would be a fair share). Usage:
#   busy_neighbour.py TRAIN_DOMAINS ROUNDS STEPS [label=ENV=VALUE[,ENV=VALUE] ...]
# Each label is a variant (e.g. pthread=LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/openblas-pthread); the
# default variant runs the environment as it is. BUSY_CMD (environment) replaces the busy loop, e.g. a
# two-job compile: BUSY_CMD='while :; do make -B -j2 some.o; done'.
import json, os, statistics, subprocess, sys
exe, rounds, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3]
variants = [("default", {})]
for v in sys.argv[4:]:
    label, _, envs = v.partition("=")
    variants.append((label, dict(e.split("=", 1) for e in envs.split(","))))
def run(env):
    out = "/tmp/busy_td.jsonl"
    subprocess.run([exe, "--steps", steps, "--eval-interval", "0", "--json", out], env=dict(os.environ, **env), check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads(open(out).read().splitlines()[-1])["tokens_per_s"]
res = {l: {"alone": [], "busy": []} for l, _ in variants}
for r in range(rounds):
    for label, env in (variants if r % 2 == 0 else variants[::-1]):
        res[label]["alone"].append(run(env))
        busy = subprocess.Popen(["sh", "-c", os.environ.get("BUSY_CMD", "while :; do :; done")], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            res[label]["busy"].append(run(env))
        finally:
            os.killpg(busy.pid, 9)
print(f"{'variant':10s} {'alone tok/s':>12s} {'busy tok/s':>12s} {'busy/alone':>10s}   (medians of {rounds} rounds, {steps} steps)")
table = {}
for label, _ in variants:
    a, b = statistics.median(res[label]["alone"]), statistics.median(res[label]["busy"])
    table[label] = {"alone": res[label]["alone"], "busy": res[label]["busy"], "ratio": b / a}
    print(f"{label:10s} {a:12.0f} {b:12.0f} {b / a:10.2f}   busy runs: {', '.join(f'{x:.0f}' for x in res[label]['busy'])}")
json.dump(table, open("/tmp/busy_neighbour.json", "w"), indent=1)
