"""Every GPU claim of the project measured in one command (issue 12).

    pip install --no-build-isolation -e . && python benchmarks/gpu_report.py --out $OUT/gpu
    python benchmarks/gpu_report.py --out /tmp/smoke --smoke     # tiny sizes on the CPU (CI)

Each part runs in its own subprocess with its own time limit (a slow or crashing part cannot lose
the others' results) and writes DIR/parts/NAME.json; the parent writes DIR/report.json and
DIR/report.md (one table per figure, device named). Every figure is a ratio against its anchor
measured in the same run. Parts needing CUDA are reported as skipped, with the reason, in --smoke.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# name -> time limit in seconds (full mode); the sum stays under 8 minutes on an H100
PARTS = {"info": 30, "pytest_cuda": 120, "sanitizer": 90, "stage_combine": 40, "reverse": 60,
         "graph_crossover": 30, "adjoint": 50, "finetune_step": 60}


class Skip(Exception):
    pass


def _device(smoke):
    import torch
    if torch.cuda.is_available() and not smoke:
        return torch.device("cuda")
    return torch.device("cpu")


def _need_cuda(smoke):
    import torch
    if smoke:
        raise Skip("--smoke runs on the CPU")
    if not torch.cuda.is_available():
        raise Skip("needs a CUDA GPU")


def part_info(smoke):
    import io
    import contextlib
    import prg_fast
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        prg_fast.info()
    return {"text": buf.getvalue()}


def _cmd(cmd, limit):
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"cmd": " ".join(cmd), "rc": "timeout", "tail": f"over its {limit} s limit"}
    return {"cmd": " ".join(cmd), "rc": res.returncode, "tail": (res.stdout + res.stderr)[-3000:]}


def part_pytest_cuda(smoke):
    _need_cuda(smoke)
    out = _cmd([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "python_tests"], PARTS["pytest_cuda"] - 5)
    return {"rows": [out], "ok": out["rc"] == 0}


def part_sanitizer(smoke):
    _need_cuda(smoke)
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        raise Skip("compute-sanitizer not on PATH")
    rows = []
    for check in ("memcheck", "racecheck"):
        # CUDA kernels: every code path; Triton kernels: their cuda-marked tests
        for target in (["python_tests/sanitize_cuda.py"],
                       ["-m", "pytest", "-q", "-x", "-m", "cuda", "python_tests/test_triton_kernels.py"]):
            rows.append(_cmd([tool, "--tool", check, "--error-exitcode", "1", sys.executable] + target, 20))
    return {"rows": rows, "ok": all(r["rc"] == 0 for r in rows)}


def part_stage_combine(smoke):
    import kernels
    dev = _device(smoke)
    timer = kernels.Timer(dev, reps=3 if smoke else 10, batch_s=0.001 if smoke else 0.01)
    res = kernels.run(dev, [12] if smoke else [20, 24, 26], [3], ["float32", "bf16"], timer,
                      with_compile=not smoke, echo=False)
    rows = [{"log2n": r["log2n"], "dtype": r["dtype"], "terms": r["terms"],
             **{f"{b}/copy": round(r["us"]["copy_"] / r["us"][b], 3) for b in kernels.fused_names(r)},
             **{f"{b}/best_torch": round(kernels.best_torch(r)[1] / r["us"][b], 3) for b in kernels.fused_names(r)}}
            for r in res]
    return {"device": kernels.device_name(dev), "goal": "fused backend/copy >= 0.85 and faster than the best "
            "torch formulation (benchmarks/kernels.py)", "rows": rows}


def _reverse_rows(smoke, batches, graph):
    import torch
    import torchdiffeq
    import prg_fast
    from prg_fast.models import UNet
    from adjoint_memory import TorchdiffeqFunc
    from reverse_speed import timer
    dev = _device(smoke)
    preset, size, steps = ("tiny", 8, 2) if smoke else ("cifar", 32, 10)
    torch.manual_seed(0)
    model = UNet.preset(preset, in_channels=3, image_size=size, dropout=0.0).to(dev).eval()
    grid = torch.linspace(0, 1, steps + 1, device=dev)
    rows = []
    for b in batches:
        x = torch.randn(b, 3, size, size, device=dev)
        with torch.no_grad():
            tdq = timer(lambda: torchdiffeq.odeint(TorchdiffeqFunc(model), x, grid, method="euler"), dev, 3)
            prg = timer(lambda: prg_fast.reverse(model, x, steps=steps, method="euler"), dev, 3)
            row = {"batch": b, "tdq_ms": round(tdq * 1e3, 3), "prg_ms": round(prg * 1e3, 3),
                   "tdq/prg": round(tdq / prg, 3)}
            if graph and dev.type == "cuda":
                g = timer(lambda: prg_fast.reverse(model, x, steps=steps, method="euler", cuda_graph=True), dev, 3)
                row.update({"prg_graph_ms": round(g * 1e3, 3), "tdq/prg_graph": round(tdq / g, 3),
                            "graph/eager": round(g / prg, 3), "numel": x.numel()})
            rows.append(row)
    return dev, rows


def part_reverse(smoke):
    dev, rows = _reverse_rows(smoke, [1, 2] if smoke else [1, 8, 128], graph=True)
    return {"device": str(dev), "goal": "tdq/prg >= 2 at batch <= 8 (euler, no grad)", "rows": rows}


def part_graph_crossover(smoke):
    _need_cuda(smoke)
    dev, rows = _reverse_rows(smoke, [1, 4, 16, 64, 256], graph=True)
    cross = next((r["numel"] for r in rows if r["graph/eager"] >= 0.95), None)
    return {"device": str(dev), "rows": rows, "crossover_numel": cross,
            "note": "set PRG_FAST_CUDA_GRAPH_MAX_NUMEL below crossover_numel (None: graphs paid at every size)"}


def part_adjoint(smoke):
    import adjoint_memory
    dev = _device(smoke)
    if dev.type != "cuda":
        raise Skip("max_memory_allocated needs CUDA (benchmarks/adjoint_memory.py measures RSS on the CPU)")
    args = argparse.Namespace(model="cifar", size=32, batch=32, method="euler", reps=2, grad_batch=4)
    rows = []
    for impl in ("prg_fast", "backprop"):
        for k in (1, 31):
            peak, sec = adjoint_memory.measure(args, impl, k, dev)
            rows.append({"impl": impl, "K": k, "peak_MiB": round(peak / 2 ** 20, 1), "s": round(sec, 4)})
    by = {(r["impl"], r["K"]): r for r in rows}
    ratios = {"adjoint K31/K1 memory": by["prg_fast", 31]["peak_MiB"] / max(by["prg_fast", 1]["peak_MiB"], 1e-9),
              "adjoint/backprop memory K31": by["prg_fast", 31]["peak_MiB"] / max(by["backprop", 31]["peak_MiB"], 1e-9),
              "adjoint/backprop time K31": by["prg_fast", 31]["s"] / by["backprop", 31]["s"]}
    errs = adjoint_memory.grad_errors(args, dev, 31)
    return {"device": str(dev), "rows": rows, "ratios": ratios, "grad_errors": errs}


def part_finetune_step(smoke):
    import torch
    import torchdiffeq
    import prg_fast
    from prg_fast.models import UNet, ClassifierHead
    from adjoint_memory import TorchdiffeqFunc
    from reverse_speed import timer
    dev = _device(smoke)
    preset, size, batch, steps = ("tiny", 8, 2, 2) if smoke else ("cifar", 32, 128, 31)
    torch.manual_seed(0)
    unet = UNet.preset(preset, in_channels=3, image_size=size, dropout=0.0).to(dev)
    head = ClassifierHead((3, size, size), 10).to(dev)
    opt = torch.optim.AdamW(list(unet.parameters()) + list(head.parameters()), lr=1e-5)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    grid = torch.linspace(0, 1, steps + 1, device=dev)

    def pretrain():  # one flow-matching step: the memory anchor
        t = torch.rand(batch, device=dev)
        noise = torch.randn_like(x)
        with amp:
            v = unet(t, (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise)
            loss = ((v.float() - (noise - x)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def prg_step():
        with amp:
            z = prg_fast.reverse(unet, x, steps=steps, method="euler", adjoint=True)
            loss = torch.nn.functional.cross_entropy(head(z).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def released_step():  # the released PRG way: torchdiffeq odeint_adjoint, float32
        z = torchdiffeq.odeint_adjoint(TorchdiffeqFunc(unet), x, grid, method="euler",
                                       adjoint_params=list(unet.parameters()))[-1]
        loss = torch.nn.functional.cross_entropy(head(z), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def peak(fn):
        if dev.type != "cuda":
            return None
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20

    reps = 1 if smoke else 3
    t_prg, t_rel = timer(prg_step, dev, reps), timer(released_step, dev, reps)
    m_pre, m_prg = peak(pretrain), peak(prg_step)
    return {"device": str(dev), "goal": "memory prg/pretrain <= 1.2; images/s prg/released >= 3",
            "rows": [{"preset": preset, "batch": batch, "steps": steps,
                      "prg_img_s": round(batch / t_prg, 2), "released_img_s": round(batch / t_rel, 2),
                      "prg/released img_s": round(t_rel / t_prg, 3),
                      "pretrain_MiB": m_pre and round(m_pre, 1), "prg_MiB": m_prg and round(m_prg, 1),
                      "prg/pretrain memory": (m_prg / m_pre) if m_pre else None}]}


def run_part(name, smoke, out):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        res = {"status": "ok", **globals()["part_" + name](smoke)}
    except Skip as e:
        res = {"status": "skipped", "reason": str(e)}
    with open(os.path.join(out, "parts", name + ".json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


def table(rows):
    if not rows:
        return "(no rows)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r if k != "tail"))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", choices=list(PARTS), help="run these parts only")
    args = ap.parse_args(argv)
    os.makedirs(os.path.join(args.out, "parts"), exist_ok=True)
    if args.part:
        run_part(args.part, args.smoke, args.out)
        return 0
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "CPU (smoke)"
    report = {"device": device, "smoke": args.smoke, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "torch": torch.__version__, "parts": {}}
    for name, limit in PARTS.items():
        if args.only and name not in args.only:
            continue
        path = os.path.join(args.out, "parts", name + ".json")
        if os.path.exists(path):
            os.remove(path)
        t0 = time.time()
        cmd = [sys.executable, __file__, "--out", args.out, "--part", name] + (["--smoke"] if args.smoke else [])
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            if os.path.exists(path):
                with open(path) as f:
                    part = json.load(f)
            else:
                part = {"status": "failed", "rc": res.returncode, "tail": res.stderr[-3000:]}
        except subprocess.TimeoutExpired:
            part = {"status": "timeout", "reason": f"over its {limit} s limit"}
        part["seconds"] = round(time.time() - t0, 1)
        report["parts"][name] = part
        print(f"== {name}: {part['status']} ({part['seconds']} s) {part.get('reason', '')}", flush=True)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    md = [f"# prg_fast GPU report\n\nDevice: {device}; torch {report['torch']}; {report['date']}"
          f"{' (smoke)' if args.smoke else ''}\n"]
    for name, part in report["parts"].items():
        md.append(f"\n## {name}: {part['status']} ({part['seconds']} s)\n")
        for k in ("reason", "goal", "device", "crossover_numel", "note", "ratios", "grad_errors", "text"):
            if part.get(k) is not None:
                md.append(f"{k}: {part[k]}\n" if k != "text" else f"```\n{part[k]}```\n")
        if part.get("rows"):
            md.append(table(part["rows"]))
        if part.get("tail"):
            md.append(f"```\n{part['tail'][-1500:]}\n```\n")
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(md))
    print(f"wrote {args.out}/report.json and report.md")
    bad = [n for n, p in report["parts"].items() if p["status"] in ("failed", "timeout") or p.get("ok") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
