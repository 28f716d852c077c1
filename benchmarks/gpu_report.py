"""Every GPU claim of the project, measured under one global deadline (issue 24; docs/gpu.md has the
parts, their caps and what each proves).

    bash benchmarks/gpu_check.sh --out $OUT/gpu       # builds for sm_90, then runs this (8 min wall)
    python benchmarks/gpu_report.py --out DIR          # this alone, on an already built checkout
    python benchmarks/gpu_report.py --out DIR --smoke  # tiny sizes on the CPU (CI)

Each part (benchmarks/gpu_parts.py) runs in its own process group for min(its cap, the time left);
one still running at the deadline is killed and reported "cut" with the rows it had written, one
with no time left "not run". DIR/report.json and report.md are rewritten after every part; DIR
holds at most 8 files.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from gpu_parts import PARTS, Context, Part, child_env, read_result, run_part  # noqa: E402
from gpu_results import render  # noqa: E402  (report.json -> markdown, shared with RESULTS.md)

MIN_START_S = 8  # a part is not started with less time than this left (imports alone take seconds)


RUNNING: List[Optional[subprocess.Popen]] = [None]  # the part running now, for the signal handler


def stop_on_signal(signum, frame):
    """Terminated from outside (a tool's timeout): take the running part's group down too; the
    report on disk already holds every part finished before."""
    if RUNNING[0] is not None:
        try:
            os.killpg(RUNNING[0].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def supervise(part: Part, args, scratch: str, deadline_at: float) -> dict:
    """Run one part in its own process group under min(cap, time left); cut it at the deadline."""
    left = deadline_at - time.monotonic()
    if left < MIN_START_S:
        return {"status": "not run", "reason": f"deadline: {max(left, 0):.0f} s left of --deadline {args.deadline:g}"}
    cap = part.cap_s * (args.cap_scale if args.smoke else 1.0)
    limit = min(cap, left)
    cmd = [sys.executable, os.path.abspath(__file__), "--part", part.name, "--out", args.out, "--scratch", scratch,
           "--cuda-set", args.cuda_set] + (["--smoke"] if args.smoke else []) + \
          (["--stall", args.stall] if args.stall else [])
    t0 = time.monotonic()
    with open(os.path.join(args.out, "parts.log"), "a") as log:
        log.write(f"\n==== part {part.name} (limit {limit:.0f} s)\n")
        log.flush()
        # its own process group (not a new session: a kill of the whole command still reaches it)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                                preexec_fn=os.setpgrp)
        RUNNING[0] = proc
        try:
            proc.wait(timeout=limit)
            cut = None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and everything it started
            proc.wait()
            cut = "cut" if limit < cap else "timeout"
        RUNNING[0] = None
    res = read_result(os.path.join(scratch, part.name + ".json"))
    if cut:
        why = "the global deadline" if cut == "cut" else f"its own {cap:.0f} s cap"
        res.update(status=cut, reason=f"killed at {limit:.0f} s by {why}; rows measured before are kept")
    elif "status" not in res:
        res.update(status="failed", reason=f"exited {proc.returncode} without a result (parts.log has its output)")
    res["seconds"] = round(time.monotonic() - t0, 1)
    return res


def build_record(args) -> dict:
    if args.build_rc is None:
        return {"status": "skipped", "reason": "not built by this run (gpu_check.sh builds; --smoke does not)"}
    rec = {"status": "ok" if args.build_rc == "0" else "failed", "rc": args.build_rc, "seconds": args.build_seconds,
           "log": "build.log"}
    log = os.path.join(args.out, "build.log")
    if rec["status"] != "ok" and os.path.exists(log):
        with open(log, errors="replace") as f:
            rec["tail"] = f.read()[-2500:]
    return rec


def write_report(report: dict, out: str) -> None:
    for name, text in (("report.json", json.dumps(report, indent=1, default=str)), ("report.md", render(report))):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (at most 8 files)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU; CUDA-only parts say skipped")
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds for all parts together (default 420)")
    ap.add_argument("--only", nargs="+", choices=[p.name for p in PARTS], help="run these parts only")
    ap.add_argument("--cuda-set", choices=("quick", "all"), default="quick",
                    help="correctness: the quick subset (-m cuda_quick) or every cuda test (-m cuda)")
    ap.add_argument("--cap-scale", type=float, default=2.0, help="--smoke: scale of each part's cap (slow CPUs)")
    ap.add_argument("--build-rc", help=argparse.SUPPRESS)  # from gpu_check.sh
    ap.add_argument("--build-seconds", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--stall", choices=[p.name for p in PARTS], help=argparse.SUPPRESS)  # tests of the deadline
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.part:
        part = next(p for p in PARTS if p.name == args.part)
        run_part(part, Context(part.name, args.smoke, args.out, args.scratch, args.stall, args.cuda_set))
        return 0
    start = time.monotonic()
    deadline_at = start + args.deadline
    report = {"smoke": args.smoke, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "deadline_s": args.deadline, "build": build_record(args), "parts": {}}
    scratch = tempfile.mkdtemp(prefix="prg_fast_gpu_report_")
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop_on_signal)
    try:
        for part in PARTS:
            if args.only and part.name not in args.only:
                continue
            res = supervise(part, args, scratch, deadline_at)
            res["claim"] = res.get("claim", part.claim)
            report["parts"][part.name] = res
            if part.name == "info" and "device" in res:
                report.update(device=res["device"], torch=res.get("torch"))
            report["elapsed_s"] = round(time.monotonic() - start, 1)
            write_report(report, args.out)
            print(f"== {part.name}: {res['status']} ({res.get('seconds', 0)} s) {res.get('reason', '')}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_report(report, args.out)
    print(f"wrote {args.out}/report.json and report.md ({report['elapsed_s']} s)")
    failed = [n for n, p in report["parts"].items() if p["status"] in ("failed", "timeout")]
    if report["build"]["status"] == "failed":
        failed.insert(0, "build")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
