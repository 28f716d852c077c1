"""prg_fast.info(): what was built, and for what is missing, why."""
from __future__ import annotations

from typing import Optional

import torch

from . import backends, ops
from .version import __version__


def info(print_out: bool = True) -> Optional[str]:
    """Print the build report (`prg_fast.info()`, returns None), or return it as a string without
    printing (`info(print_out=False)`): one or the other, so `print(prg_fast.info())` shows it once."""
    build = ops.build_info()
    status = backends.status()
    lines = [f"prg_fast {__version__} on torch {torch.__version__}"]
    if build:
        lines.append(f"  built against torch {build.get('torch')}")

    def row(name, why, extra=""):
        lines.append(f"  {name:<10} {'yes' + extra if why is None else 'no: ' + why}")

    row("cpu ops", status["cpu"], " (prg_fast::stage_combine, C++ kernels)")
    arch = build.get("cuda_arch_list") or "?"
    row("cuda ops", status["cuda"], f" (arch list {arch}; GPU visible: {torch.cuda.is_available()})")
    if status["triton"] is None:
        import triton

        mode = "interpreter (TRITON_INTERPRET=1)" if backends.triton_interpreted() else "compiled"
        row("triton", None, f" (triton {triton.__version__}, {mode})")
    else:
        row("triton", status["triton"])
    graphs_ok = torch.cuda.is_available()
    row("cuda graphs", None if graphs_ok else "no CUDA device visible", " (reverse/generate cuda_graph=True)")
    row("reference", None, " (pure PyTorch oracle)")
    text = "\n".join(lines)
    if print_out:
        print(text)
        return None
    return text
