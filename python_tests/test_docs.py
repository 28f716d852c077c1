"""Every code block of README.md and docs/*.md runs here, so the pages cannot drift from the code.

- ```python blocks run as written: the blocks of one page in order, in one namespace, in a fresh
  folder; then CLAIMS[page] asserts what the page's text says they produce. A page importing an
  optional package that is missing (diffusers) is skipped with that reason.
- ```bash blocks: every command is checked by its kind. `prg-fast ...` / `python -m prg_fast ...`
  lines are parsed by the real command-line parser (every flag exists and its value parses), and
  those in RUN also run; `python benchmarks/X.py ...` lines name a script that exists and flags it
  defines; the rest are skipped by a reason listed in SKIPPED. A command of no known kind fails.
- Blocks without a language are text (a file tree), not code.

Pages and blocks are found at collection, so a block added later is checked without a change here.
"""
from __future__ import annotations

import ast
import contextlib
import glob
import importlib.util
import io
import os
import re
import shlex
from dataclasses import dataclass
from typing import Callable, Dict, List

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
SHELL = ("bash", "sh", "shell", "console")


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks(page: str) -> List[Block]:
    blocks, current = [], None
    with open(os.path.join(ROOT, page)) as f:
        for n, line in enumerate(f, 1):
            fence = re.match(r"^(\s*)```\s*([\w+-]*)\s*$", line)
            if current is None and fence:
                current = Block(page, n, fence.group(2).lower(), ""), len(fence.group(1))
            elif current is not None and fence and not fence.group(2):
                blocks.append(current[0])
                current = None
            elif current is not None:
                current[0].text += line[current[1]:] if line[:current[1]].isspace() else line
    assert current is None, f"{page}: the code block opened at line {current[0].line} is never closed"
    return blocks


BLOCKS = [b for page in PAGES for b in read_blocks(page)]


def test_every_block_has_a_known_language():
    for b in BLOCKS:
        assert b.lang in ("python", "", "text") + SHELL, f"{b.id}: a ```{b.lang} block: teach test_docs.py to run it"


def test_the_pages_have_the_blocks_this_file_checks():
    # the collection itself can fail silently (a fence this parser misses): these must be found
    kinds = {(b.page, b.lang) for b in BLOCKS}
    for page, lang in (("README.md", "python"), ("README.md", "bash"), ("docs/cli.md", "bash"),
                       ("docs/engine.md", "python"), ("docs/diffusion.md", "python")):
        assert (page, lang) in kinds, f"no ```{lang} block found in {page}"


# ------------------------------------------------------------------------------------------------
# Python: run each page's blocks in order, then assert what its text claims


def readme_claims(ns: dict) -> None:
    x, z, feats = ns["x"], ns["z"], ns["feats"]
    assert feats.shape == (3, 16, 1, 8, 8)  # "a feature hierarchy (3, 16, 1, 8, 8)"
    # "a fresh UNet's output layer starts at zero ... the first z equals x exactly; after the step it moves"
    assert torch.equal(z, x)
    assert not torch.equal(feats[-1], x)
    assert all(p.grad is not None for p in ns["head"].parameters())


def engine_claims(ns: dict) -> None:
    x, feats, x_back, ys, t = ns["x"], ns["feats"], ns["x_back"], ns["ys"], ns["t"]
    assert feats.shape == (3,) + x.shape  # "(3, B, ...)"
    # "noise -> data: x, to rk4's error": 20 rk4 steps of a smooth velocity there and back, error
    # ~h^4 = 6e-6 of the state, plus float32 rounding of 40 steps
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-4)
    assert ys.shape == (5, 3) and torch.equal(ys[0], torch.ones(3))  # "(5, 3)", the first state is y0
    assert t.grad is not None and t.grad != 0  # "fills t.grad"
    assert ns["net"][0].weight.grad is not None  # "(and net's .grad)"
    assert ns["z"].shape == x.shape  # one end time per sample, one state per sample
    # adaptive odeint: exp(-t) to tsit5's default tolerances; the event at ln 2
    torch.testing.assert_close(ns["sol"], torch.exp(-ns["times"])[:, None].expand(5, 3), rtol=1e-5, atol=0)
    assert ns["stats"].accepted > 0
    torch.testing.assert_close(ns["t_event"], torch.tensor(0.6931471805599453, dtype=torch.float64), rtol=1e-5, atol=0)


def cli_claims(ns: dict) -> None:
    for run in ("runs/mine", "runs/mine_ft"):  # both commands wrote their run directories
        assert os.path.exists(os.path.join(run, "checkpoint.pt")) and os.path.exists(os.path.join(run, "metrics.json"))


def diffusion_claims(ns: dict) -> None:
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    unet, scheduler, x, noise, y, z = (ns[k] for k in ("unet", "scheduler", "x", "noise", "y", "z"))
    with torch.no_grad():
        inverse = DDIMInverseScheduler.from_config(scheduler.config)
        inverse.set_timesteps(50)
        latent = x
        for t in inverse.timesteps:
            latent = inverse.step(unet(latent, t).sample, t, latent).prev_sample
        sampler = DDIMScheduler.from_config(scheduler.config)
        sampler.set_timesteps(50)
        sample = noise
        for t in sampler.timesteps:
            sample = sampler.step(unet(sample, t).sample, t, sample).prev_sample
    # float32 throughout, 50 steps in different variables: agreement to float32 rounding of 50 steps
    torch.testing.assert_close(z, latent, rtol=1e-4, atol=1e-4 * latent.abs().max().item())  # "== DDIM inversion"
    torch.testing.assert_close(ns["x0"], sample, rtol=1e-4, atol=1e-4 * sample.abs().max().item())  # "== DDIM"
    # "the flow's state at t = 1: x_T / sqrt(alpha_bar_T)", "about 130x larger"
    alpha_bar_top = scheduler.alphas_cumprod[int(sampler.timesteps.max())].item()
    torch.testing.assert_close(y, z / alpha_bar_top ** 0.5, rtol=1e-5, atol=0)
    assert 100 < y.abs().max() / z.abs().max() < 160
    assert ns["z_fine"].shape == z.shape


def benchmarks_claims(ns: dict) -> None:
    import harness

    rows = ns["log"].rows(ns["keys"])
    assert [r["impl"] for r in rows] == ["ours", "theirs"]
    assert all(r["seconds"] > 0 and r["peak_bytes"] >= 0 for r in rows)
    assert rows[1]["ratio"] == 1.0  # the anchor's ratio to itself, per round
    lines = harness.read_lines(os.path.join("runs", "my_bench", "my_bench.jsonl"))
    assert lines[0]["config"] == {"size": 256} and "machine" in lines[0]
    # "Run again, it measures nothing": the same settings resume from the file
    again = harness.Results(ns["args"], "my_bench", config={"size": 256}, key=("impl",))
    assert again.has(ns["keys"], "seconds") and again.has(ns["keys"], "peak_bytes")


def reward_claims(ns: dict) -> None:
    res = ns["res"]
    assert res.step == 4 and os.path.exists(os.path.join("runs", "mine", "samples.png"))
    assert {"reward", "reward_pretrained", "kl"} <= set(res.metrics)
    lora = [p for p in ns["model"].parameters() if p.requires_grad]  # the adapter's weights, given gradients
    assert lora and all(p.grad is not None for p in lora)


CLAIMS: Dict[str, Callable[[dict], None]] = {
    "docs/reward.md": reward_claims,
    "README.md": readme_claims,
    "docs/benchmarks.md": benchmarks_claims,
    "docs/engine.md": engine_claims,
    "docs/cli.md": cli_claims,
    "docs/diffusion.md": diffusion_claims,
}
PYTHON_PAGES = sorted({b.page for b in BLOCKS if b.lang == "python"})


def missing_imports(source: str) -> List[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_python_blocks_run_and_say_what_they_do(page, tmp_path, monkeypatch):
    # benchmark examples are scripts in benchmarks/, where `import harness` finds the harness: the
    # same here whatever other test modules put on sys.path before
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    blocks = [b for b in BLOCKS if b.page == page and b.lang == "python"]
    missing = missing_imports("".join(b.text for b in blocks))
    if missing:
        pytest.skip(f"{page}'s examples need {', '.join(missing)}, which is not installed")
    assert page in CLAIMS, f"{page} has Python blocks: add what its text says they produce to CLAIMS"
    monkeypatch.chdir(tmp_path)  # examples write run directories (runs/...) where they run
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    for b in blocks:
        # as a reader runs it: one namespace per page; errors point at the page's line
        exec(compile("\n" * b.line + b.text, os.path.join(ROOT, page), "exec"), namespace)
    CLAIMS[page](namespace)


# ------------------------------------------------------------------------------------------------
# Shell: every command checked by its kind

SKIPPED = {
    "pip install": "the README's install: CI's first leg runs the README's commands verbatim in a fresh venv (.ci/run)",
    "python -m pytest": "the README's test command: CI's first leg runs it verbatim (.ci/run)",
    "bash benchmarks/gpu_check.sh": "needs a GPU machine; its CPU smoke mode runs in .ci/run and test_gpu_report.py",
}
# commands cheap enough to run here, in-process, and what their output must show
RUN = {"prg-fast info": "cpu ops    yes"}


def commands(block: Block) -> List[str]:
    """The block's commands: continuation lines joined, comments dropped, && and ; chains split."""
    text = re.sub(r"\\\n", " ", block.text)
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        line = " ".join(shlex.quote(w) if w not in ("&&", ";") else w for w in words)
        out += [c.strip() for c in re.split(r"\s(?:&&|;)\s", line) if c.strip()]
    return out


def check_cli(words: List[str]) -> None:
    from prg_fast.cli import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = build_parser().parse_args(words)
        except SystemExit as e:
            raise AssertionError(f"prg-fast {shlex.join(words)}: the parser refuses it:\n{err.getvalue()}") from e
    assert getattr(args, "func", None) is not None, f"prg-fast {shlex.join(words)}: no command"


def check_script(path: str, words: List[str]) -> None:
    full = os.path.join(ROOT, path)
    assert os.path.isfile(full), f"{path} does not exist"
    with open(full) as f:
        source = f.read()
    for w in words:
        flag = w.split("=")[0]
        if flag.startswith("--"):
            defined = f'"{flag}"' in source or f"'{flag}'" in source or f"{flag})" in source  # argparse / bash case
            assert defined, f"{path} defines no flag {flag}"


def run_cli(words: List[str]) -> str:
    from prg_fast.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(words)
    assert rc == 0, f"prg-fast {shlex.join(words)} exited {rc}"
    return out.getvalue()


SHELL_BLOCKS = [b for b in BLOCKS if b.lang in SHELL]


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.id for b in SHELL_BLOCKS])
def test_shell_commands_exist_and_parse(block):
    checked = 0
    for command in commands(block):
        words = shlex.split(command)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # an environment setting first
            words = words[1:]
        command = shlex.join(words)
        reason = next((r for prefix, r in SKIPPED.items() if command.startswith(prefix)), None)
        if reason:
            continue
        if words[0] == "prg-fast" or words[:3] == ["python", "-m", "prg_fast"]:
            cli = words[1:] if words[0] == "prg-fast" else words[3:]
            check_cli(cli)
            expected = RUN.get("prg-fast " + " ".join(cli))
            if expected is not None:
                assert expected in run_cli(cli), f"{block.id}: prg-fast {shlex.join(cli)} does not print {expected!r}"
        elif words[0] in ("python", "bash") and len(words) > 1 and words[1].startswith("benchmarks/"):
            check_script(words[1], words[2:])
        else:
            raise AssertionError(f"{block.id}: a command test_docs.py does not know how to check: {command!r} "
                                 "(add a rule, or a reason to SKIPPED)")
        checked += 1
    if not checked:
        pytest.skip("; ".join(sorted({r for p, r in SKIPPED.items() if any(c.startswith(p) for c in commands(block))})))

