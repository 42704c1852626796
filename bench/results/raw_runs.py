#!/usr/bin/env python3
"""Pack the per-run files of one experiment into one JSON-lines archive, and get them back.

bench/results keeps, per experiment with many runs, a summary (README.md) and one archive of the raw
runs, raw-runs.jsonl (see bench/results/README.md). Each line of the archive is one run:

  {"name": "b1-s150-g1",                   # the run's name: its files' common stem
   "command": "build/cpu/.../train_lm ...", # how it was run (null when not known)
   "final_eval": {...},                     # the last "type":"eval" row of its metrics, for a quick look
   "files": {"runs/b1-s150-g1.jsonl": "...", "runs/b1-s150-g1.log": "..."}}

"files" maps each file's path, relative to the experiment's folder, to its text exactly as it was
(or, for a file that is not UTF-8, {"base64": "..."}), so `unpack` writes the same bytes back.

  raw_runs.py pack DIR ARCHIVE [--glob 'runs/*'] [--commands COMMANDS.jsonl]
      every file matching --glob under DIR (default: *.jsonl and *.log directly in DIR), grouped by
      stem; COMMANDS.jsonl: lines {"name": ..., "command": ...}
  raw_runs.py unpack ARCHIVE DIR      writes every run's files under DIR (their recorded paths)
  raw_runs.py verify ARCHIVE DIR      checks that DIR holds exactly the archived bytes
  raw_runs.py list ARCHIVE            one line per run: name, final held-out loss, files

Example (the equal-time runs' metrics into OUT, for tools/plot_run):
  python3 bench/results/raw_runs.py unpack bench/results/equal-time-2026-12-06-epyc-zen3-2core/raw-runs.jsonl OUT
"""
import argparse
import base64
import json
import os
import pathlib
import sys


def _encode(data: bytes):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def _decode(value) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    return base64.b64decode(value["base64"])


def _final_eval(text):
    last = None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("type") == "eval":
            last = row
    return last


def _runs(path):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"{path}:{number}: not JSON: {e}")


def pack(args):
    root = pathlib.Path(args.dir)
    patterns = args.glob or ["*.jsonl", "*.log"]
    files = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    if not files:
        sys.exit(f"pack: no files match {patterns} under {root}")
    commands = {}
    if args.commands:
        commands = {r["name"]: r.get("command") for r in _runs(args.commands)}
    by_stem = {}
    for p in files:
        rel = p.relative_to(root).as_posix()
        by_stem.setdefault(rel.rsplit("/", 1)[-1].split(".", 1)[0], []).append((rel, p))
    with open(args.archive, "w", encoding="utf-8") as out:
        for name in sorted(by_stem):
            record = {"name": name, "command": commands.get(name), "final_eval": None, "files": {}}
            for rel, p in sorted(by_stem[name]):
                record["files"][rel] = _encode(p.read_bytes())
                if rel.endswith(".jsonl") and isinstance(record["files"][rel], str):
                    record["final_eval"] = _final_eval(record["files"][rel]) or record["final_eval"]
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"pack: {len(by_stem)} runs, {len(files)} files -> {args.archive}")


def _safe_target(root, rel):
    target = (root / rel).resolve()
    if os.path.commonpath([str(root.resolve()), str(target)]) != str(root.resolve()):
        sys.exit(f"refusing to write outside {root}: {rel}")
    return target


def unpack(args):
    root = pathlib.Path(args.dir)
    count = 0
    for run in _runs(args.archive):
        for rel, value in run["files"].items():
            target = _safe_target(root, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_decode(value))
            count += 1
    print(f"unpack: {count} files -> {root}")


def verify(args):
    root = pathlib.Path(args.dir)
    bad = 0
    count = 0
    for run in _runs(args.archive):
        for rel, value in run["files"].items():
            count += 1
            p = root / rel
            if not p.is_file() or p.read_bytes() != _decode(value):
                print(f"verify: {rel} differs or is missing under {root}")
                bad += 1
    print(f"verify: {count - bad} of {count} files identical")
    return 1 if bad else 0


def list_runs(args):
    for run in _runs(args.archive):
        ev = run.get("final_eval") or {}
        loss = ev.get("heldout_loss")
        print(f"{run['name']:<24} {'' if loss is None else f'{loss:.4f}':>8}  {' '.join(run['files'])}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pack")
    p.add_argument("dir")
    p.add_argument("archive")
    p.add_argument("--glob", action="append", help="files to pack, relative to DIR (repeatable)")
    p.add_argument("--commands", help="JSON lines {\"name\": ..., \"command\": ...}")
    p.set_defaults(run=pack)
    for name, fn in (("unpack", unpack), ("verify", verify)):
        p = sub.add_parser(name)
        p.add_argument("archive")
        p.add_argument("dir")
        p.set_defaults(run=fn)
    p = sub.add_parser("list")
    p.add_argument("archive")
    p.set_defaults(run=list_runs)
    args = parser.parse_args()
    sys.exit(args.run(args) or 0)


if __name__ == "__main__":
    main()
