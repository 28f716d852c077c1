"""The parts of the GPU check (benchmarks/gpu_report.py runs each in its own process under the
global deadline): what each measures, in order of value (PARTS below; docs/gpu.md has their table),
and the Context a part's process gets.

The benchmark parts run their script and read its harness results file (JSON lines) as it grows.
A part returns a dict (rows, figures, "ok": False with a "reason" when its check fails), raises
Skip with the reason it cannot run here, and calls ctx.progress() with what it has measured so far
(a part killed by the deadline keeps that).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

class Skip(Exception):
    """A part that cannot run here; the message says why."""


@dataclass
class Part:
    name: str
    cap_s: float  # its own limit on the GPU machine (the global deadline may leave it less)
    claim: str  # what it proves
    run: Callable[["Context"], dict]


class Context:
    """What a part's process gets: the mode, the folders, and progress() to save partial results."""

    def __init__(self, name: str, smoke: bool, out: str, scratch: str, stall: Optional[str], cuda_set: str):
        self.name, self.smoke, self.out, self.scratch, self.cuda_set = name, smoke, out, scratch, cuda_set
        self.stall = stall == name
        self.result_path = os.path.join(scratch, name + ".json")

    def progress(self, result: dict) -> None:
        """Save what is measured so far (atomically): a part cut by the deadline keeps it."""
        tmp = self.result_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(tmp, self.result_path)
        if self.stall:  # --stall NAME (tests): hang after the first progress, as a slow part would
            time.sleep(1e6)

    def device(self):
        import torch

        if self.smoke:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise Skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
        return torch.device("cuda")

    def run_logged(self, cmd: List[str], log_name: str = "parts.log", timeout: Optional[float] = None,
                   on_line: Optional[Callable[[str], None]] = None) -> int:
        """Run `cmd` (cwd: the repository root), appending its output to DIR/log_name; on_line is
        called with every output line as it comes. Returns the exit status."""
        with open(os.path.join(self.out, log_name), "a") as log:
            log.write(f"\n== [{self.name}] {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=child_env())
            # a watchdog, not a check per line: a command that hangs silently is stopped too
            watchdog = threading.Timer(timeout, kill_tree, (proc,)) if timeout is not None else None
            if watchdog:
                watchdog.start()
            try:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    if on_line:
                        on_line(line)
                rc = proc.wait()
            finally:
                if watchdog:
                    watchdog.cancel()
            if rc == -signal.SIGKILL and timeout is not None:
                log.write(f"== killed at its {timeout:.0f} s limit\n")
            return rc


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a command and every process it started, however deep: compute-sanitizer runs its target
    as a child, and any descendant left alive keeps the output pipe open, so the reader would wait
    for it past the limit. Each process is stopped before its children are listed, so none can start
    another unseen; then all are killed. The process group stays the part's own (a kill of the part
    by the global deadline reaches them too). Linux's /proc lists the children: the GPU check runs
    on Linux; elsewhere only the command itself is killed."""
    stopped: List[int] = []
    frontier = [proc.pid]
    while frontier:
        for pid in frontier:
            signal_quietly(pid, signal.SIGSTOP)
        stopped += frontier
        frontier = [pid for pid in children_of(frontier) if pid not in stopped]
    for pid in stopped:
        signal_quietly(pid, signal.SIGKILL)


def signal_quietly(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):  # gone already (or reused by another user's process)
        pass


def children_of(parents: List[int]) -> List[int]:
    """The processes whose parent is one of `parents`, from /proc/PID/stat (empty without /proc)."""
    wanted, found = set(parents), []
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split at the last ")"
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid in wanted:
            found.append(int(entry))
    return found


def child_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# -------------------------------------------------------------------------------------------------
# the parts, in order of value


def part_info(ctx: Context) -> dict:
    import contextlib
    import io

    import torch

    import prg_fast
    from prg_fast.ode import backends, ops

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        prg_fast.info()
    cuda = torch.cuda.is_available()
    res = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "text": buf.getvalue(),
           "device": torch.cuda.get_device_name(0) if cuda else "CPU", "cuda_ops": ops.CUDA_ERROR or "built"}
    if cuda:
        res["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        res["triton"] = backends.unavailable_reason("triton", torch.device("cuda")) or "usable"
    if not ctx.smoke:
        res["ok"] = cuda and not ops.CUDA_ERROR and res["triton"] == "usable"
        if not res["ok"]:
            res["reason"] = (f"CUDA ops: {res['cuda_ops']}; Triton: {res.get('triton', 'n/a')}" if cuda
                             else "no CUDA device visible to torch")
    return res


PYTEST_LINE = re.compile(r"^(\S+::.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")  # pytest -v, one per test


def part_correctness(ctx: Context) -> dict:
    """The quick CUDA subset (python_tests/cuda_selection.py) or, with --cuda-set all, every
    cuda-marked test; streamed to pytest.log, counted as it goes."""
    marker = "cuda_quick" if ctx.cuda_set == "quick" else "cuda"
    cmd = [sys.executable, "-m", "pytest", "-v", "-rs", "--tb=short", "-p", "no:cacheprovider", "-m", marker,
           "-o", "faulthandler_timeout=120", *cuda_test_files()]
    counts: Dict[str, int] = {}
    failed: List[str] = []
    res = {"selection": marker, "cmd": " ".join(cmd[1:]), "counts": counts, "failed": failed}
    last = [0.0]

    def on_line(line):
        m = PYTEST_LINE.match(line)
        if m:
            counts[m.group(2)] = counts.get(m.group(2), 0) + 1
            if m.group(2) in ("FAILED", "ERROR"):
                failed.append(m.group(1))
            if time.monotonic() - last[0] > 2:
                last[0] = time.monotonic()
                ctx.progress(res)
        elif line.startswith("SKIPPED [") and len(res.setdefault("skip_reasons", [])) < 8:
            res["skip_reasons"].append(line.strip()[:300])

    rc = ctx.run_logged(cmd, "pytest.log", on_line=on_line)
    res["rc"] = rc
    passed = counts.get("PASSED", 0)
    # skips with their reasons are listed (a second GPU, memory); a missing build fails `info` instead
    res["ok"] = rc in (0, 5) and not failed and (ctx.smoke or passed > 0)
    if not res["ok"]:
        res["reason"] = (f"pytest exit {rc}: {len(failed)} failed, {counts.get('SKIPPED', 0)} skipped, {passed} passed"
                         " (pytest.log has the details)")
    return res


def cuda_test_files() -> List[str]:
    """The test files that mark anything `cuda` (collecting only these saves most of the suite's
    import time; a file marks its tests through pytest.mark.cuda, so the text is there)."""
    folder = os.path.join(ROOT, "python_tests")
    names = sorted(n for n in os.listdir(folder) if n.startswith("test_") and n.endswith(".py"))
    return [os.path.join("python_tests", n) for n in names
            if "mark.cuda" in open(os.path.join(folder, n), encoding="utf-8").read()]


def run_bench(ctx: Context, script: str, args: List[str], name: str, key: tuple, res: dict) -> int:
    """benchmarks/SCRIPT ARGS --out FOLDER; after every line it prints, the rows of its results file
    FOLDER/NAME.jsonl so far become res["rows"] (times in ms, peaks in MiB, figures rounded) and are
    saved as progress: a part cut by the deadline keeps every row measured. Returns the exit status."""
    import harness  # (torch with it: not in the supervisor's process)

    folder = os.path.join(ctx.scratch, name)
    path = os.path.join(folder, name + ".jsonl")

    def collect(line=None):
        rows = harness.read_rows(path, key)
        if rows or line is None:
            res["rows"] = [shown(r) for r in rows]
            if os.path.exists(path):
                res["settings"] = harness.read_lines(path)[0]
            ctx.progress(res)

    rc = ctx.run_logged([sys.executable, os.path.join(HERE, script), *args, "--out", folder], on_line=collect)
    collect()
    return rc


def shown(row: dict) -> dict:
    """A results row as the report shows it: solve times in ms, bytes as MiB, 4 significant digits."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            continue
        if k in ("net", "prg", "prg_graph", "tdq"):
            k, v = k + "_ms", 1e3 * v
        elif k.startswith("peak_bytes"):
            k, v = "peak_mib", v / 2 ** 20
        out[k] = float(f"{v:.4g}") if isinstance(v, float) and k != "grad_rel_err" else v
    return out


def part_adjoint(ctx: Context) -> dict:
    """P1-P3 through benchmarks/adjoint_memory.py (its results file keeps each K once measured)."""
    dev = ctx.device()
    size = ["--model", "tiny", "--batch", "2", "--size", "8", "--reps", "1", "--steps", "1", "2"] if ctx.smoke else \
        ["--model", "cifar", "--batch", "32", "--size", "32", "--reps", "3", "--steps", "4", "16"]
    impls = ["backprop", "budget_0", "auto", "budget_inf", "reversible", "tdq", "tdq_adjoint"]
    res = {"claim": "adjoint peak flat in K; time vs plain backprop; exact gradients (torchdiffeq's adjoint is not)"}
    rc = run_bench(ctx, "adjoint_memory.py", ["--device", dev.type, "--methods", "euler", "--impls", *impls, *size],
                   f"adjoint_memory_{dev.type}_{size[1]}", ("method", "steps", "impl"), res)
    if rc != 0:
        raise RuntimeError(f"adjoint_memory.py exited {rc} (parts.log has its output)")
    res["ratios"] = adjoint_ratios(res["rows"])
    return res


def adjoint_ratios(rows: List[dict]) -> dict:
    """The headline ratios from adjoint_memory.py's rows: memory growth with K, memory and time
    against plain backprop and against torchdiffeq's adjoint at the largest K."""
    by = {(r["impl"], r["steps"]): r for r in rows}
    ks = sorted({r["steps"] for r in rows})
    lo, hi = ks[0], ks[-1]
    out = {}
    for impl in dict.fromkeys(r["impl"] for r in rows):
        if (impl, lo) in by and (impl, hi) in by and by[impl, lo]["peak_mib"] > 0:
            out[f"{impl} peak K{hi}/K{lo}"] = round(by[impl, hi]["peak_mib"] / by[impl, lo]["peak_mib"], 2)
    for impl in ("budget_0", "auto"):
        for anchor in ("backprop", "tdq_adjoint"):
            if (impl, hi) in by and (anchor, hi) in by and by[anchor, hi]["peak_mib"] > 0:
                out[f"{impl}/{anchor} peak K{hi}"] = round(by[impl, hi]["peak_mib"] / by[anchor, hi]["peak_mib"], 3)
                out[f"{impl}/{anchor} time K{hi}"] = round(by[impl, hi]["seconds"] / by[anchor, hi]["seconds"], 3)
    return out


def part_kernels(ctx: Context) -> dict:
    """P5 through benchmarks/kernel_speed.py --device D --quick; its rows also go to DIR/kernels.json."""
    import harness

    dev = ctx.device()
    res = {"claim": "fused op bandwidth / copy_ >= 0.85, and faster than the best torch formulation"}
    folder = os.path.join(ctx.scratch, "kernels")
    # the smoke run (a CPU) stops below 2^20: there every call of every formulation takes milliseconds
    size = ["--sizes", "12,16", "--reps", "3"] if ctx.smoke else []
    res["rc"] = run_bench(ctx, "kernel_speed.py", ["--device", dev.type, "--quick", *size], "kernels",
                          ("dtype", "log2n", "terms"), res)
    rows = harness.read_rows(os.path.join(folder, "kernels.jsonl"), ("dtype", "log2n", "terms"))
    if not rows:
        raise Skip(f"benchmarks/kernel_speed.py measured nothing (exit {res['rc']}; parts.log has its output)")
    with open(os.path.join(ctx.out, "kernels.json"), "w") as f:
        json.dump({"settings": res.get("settings"), "rows": rows}, f, indent=1)
    res.update(rows=flat_rows(rows)[:40], file="kernels.json")
    return res


def flat_rows(rows: List[dict]) -> List[dict]:
    """Table rows of results rows whose figures are dicts ({"us": {"cuda": ...}} as "us:cuda")."""
    return [{**{k: v for k, v in row.items() if not isinstance(v, (dict, list))},
             **{f"{k}:{sub}": x for k, v in row.items() if isinstance(v, dict) for sub, x in v.items()
                if not isinstance(x, (dict, list))}} for row in rows]


def part_reverse(ctx: Context) -> dict:
    """P4 through benchmarks/reverse_speed.py (no-grad solves): eager vs CUDA graph vs torchdiffeq."""
    import reverse_speed

    dev = ctx.device()
    sizes = ["--presets", "tiny", "--batches", "1", "2", "--size", "8", "--steps", "2", "--reps", "1"] if ctx.smoke \
        else ["--presets", "tiny", "cifar", "--batches", "1", "4", "16", "64", "--size", "32", "--steps", "10",
              "--reps", "5"]
    res = {"claim": "no-grad reverse: tdq/prg >= 2 at batch <= 8; graphs pay where launch-bound"}
    if run_bench(ctx, "reverse_speed.py", ["--device", dev.type, *sizes], f"reverse_speed_{dev.type}",
                 ("case", "preset", "batch", "method"), res) != 0:
        raise RuntimeError("reverse_speed.py failed (parts.log has its output)")
    for r in res["rows"]:
        r["tdq/prg"] = round(r["tdq_ms"] / r["prg_ms"], 3)
        if "prg_graph_ms" in r:
            r["tdq/prg_graph"] = round(r["tdq_ms"] / r["prg_graph_ms"], 3)
            r["graph/eager"] = round(r["prg_graph_ms"] / r["prg_ms"], 3)
    if dev.type == "cuda":
        res["crossover"] = reverse_speed.graph_crossover(
            [dict(preset=r["preset"], numel=r["numel"], prg=r["prg_ms"], prg_graph=r["prg_graph_ms"])
             for r in res["rows"]])
        res["note"] = ("cuda_graph='auto' captures up to PRG_FAST_CUDA_GRAPH_MAX_NUMEL (default 2**18) elements; "
                       "keep it below the smallest stops_at_numel")
    return res


def part_finetune(ctx: Context) -> dict:
    """P7, P8 through benchmarks/finetune_step.py: one PRG finetuning step vs the released way."""
    dev = ctx.device()
    sizes = ["--quick", "--reps", "1"] if ctx.smoke else ["--batch", "64", "--steps", "31", "--reps", "3"]
    res = {"claim": "finetuning step: memory and images/s vs the released pipeline (odeint_adjoint, fp32); "
                    "goal 3x with bf16 autocast"}
    rc = run_bench(ctx, "finetune_step.py", ["--device", dev.type, *sizes], "finetune_step", ("impl",), res)
    if not res.get("rows"):
        raise RuntimeError(f"finetune_step.py failed (exit {rc}; parts.log has its output)")
    res["default_memory_budget"] = res.get("settings", {}).get("config", {}).get("default_memory_budget")
    res["ratios"] = finetune_ratios(res["rows"])
    if rc != 0:
        res.update(ok=False, reason=f"finetune_step.py exited {rc} (parts.log); rows are those it had saved")
    return res


def finetune_ratios(rows: List[dict]) -> dict:
    """P8 and P7 against the released pipeline's row: images/s (its time over each row's) and peak
    memory (each row's over its), as far as measured."""
    by = {r["impl"]: r for r in rows}
    released = by.get("released")
    if released is None:
        return {}
    out = {}
    for impl, r in by.items():
        if impl == "released":
            continue
        if r.get("time_vs_released"):
            out[f"{impl} images/s vs released"] = round(1.0 / r["time_vs_released"], 3)
        if r.get("peak_mib") is not None and released.get("peak_mib"):
            out[f"{impl} peak vs released"] = round(r["peak_mib"] / released["peak_mib"], 3)
    return out


def part_sanitizer(ctx: Context) -> dict:
    """compute-sanitizer memcheck/racecheck on the CUDA kernels, only if it answers quickly."""
    ctx.device()
    if ctx.smoke:
        raise Skip("--smoke runs on the CPU")
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        raise Skip("compute-sanitizer is not on the PATH")
    probe = [tool, "--tool", "memcheck", "--error-exitcode", "1", sys.executable, "-c",
             "import torch; torch.ones(8, device='cuda').sum().item()"]
    lines: List[str] = []
    rc = ctx.run_logged(probe, "sanitizer.log", timeout=45, on_line=lines.append)
    if rc != 0:
        raise Skip(f"compute-sanitizer refused or did not answer within 45 s (exit {rc}): "
                   f"{''.join(lines[-3:]).strip()[-300:]}")
    rows = []
    cuda_kernels = ["python_tests/sanitize_cuda.py"]
    triton_tests = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "cuda_quick",
                    "python_tests/test_triton_cuda.py"]
    for check, target in (("memcheck", cuda_kernels), ("racecheck", cuda_kernels), ("memcheck", triton_tests)):
        cmd = [tool, "--tool", check, "--error-exitcode", "1", sys.executable, *target]
        rc = ctx.run_logged(cmd, "sanitizer.log", timeout=60)
        rows.append({"tool": check, "target": " ".join(target[-1:]), "rc": rc})
        ctx.progress({"rows": rows})
    ok = all(r["rc"] == 0 for r in rows)
    return {"rows": rows, "ok": ok, **({} if ok else {"reason": "a check reported errors (sanitizer.log)"})}


PARTS = [
    Part("info", 60, "the build: CUDA ops for this GPU, Triton usable", part_info),
    Part("correctness", 150, "every CUDA/Triton op, dtype and strategy against the reference", part_correctness),
    Part("adjoint", 100, "P1-P3: adjoint memory and time vs backprop vs torchdiffeq (cifar)", part_adjoint),
    Part("kernels", 60, "P5: fused-op bandwidth vs copy_", part_kernels),
    Part("reverse", 60, "P4: no-grad reverse, CUDA graphs, torchdiffeq; the crossover", part_reverse),
    Part("finetune", 120, "P7, P8: a PRG finetuning step vs the released pipeline", part_finetune),
    Part("sanitizer", 120, "compute-sanitizer memcheck/racecheck, if the machine allows it", part_sanitizer),
]


# -------------------------------------------------------------------------------------------------
# in the part's own process


def run_part(part: Part, ctx: Context) -> None:
    """In the part's own process: run it and save its result (status ok / skipped / failed)."""
    try:
        res = part.run(ctx)
        res["status"] = "failed" if res.get("ok") is False else "ok"
    except Skip as e:
        res = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # the report says what broke; the next part still runs
        res = read_result(ctx.result_path)
        res.update(status="failed", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
    ctx.progress(res)  # with --stall this part then hangs: the deadline must cut it and keep this


def read_result(path: str) -> dict:
    """A part's saved result ({} when it saved none)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
