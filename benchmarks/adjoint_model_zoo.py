"""Gradient error of the exact adjoint against plain backprop through the same solver, for every
model shape of the issue-9 gauntlet (UNet presets, a DiT-style transformer, GroupNorm, dropout,
channels_last, closures, wrappers, functions of t only, aliased additive parameters, a partial
adjoint_params list), every method, float64.

    python benchmarks/adjoint_model_zoo.py

The velocities are the ones python_tests/test_model_zoo.py defines (one definition for the test
and the table); the figure is the worst relative error over x and every parameter.
"""
import importlib.util
import os
import platform
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_zoo():
    spec = importlib.util.spec_from_file_location("model_zoo", os.path.join(ROOT, "python_tests", "test_model_zoo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    torch.set_num_threads(1)
    zoo = load_zoo()
    methods = zoo.METHODS
    print(f"adjoint vs plain backprop, float64, worst relative gradient error; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, CPU, one thread")
    print(f"| model | {' | '.join(methods)} |")
    print("|---" * (len(methods) + 1) + "|")
    worst = 0.0
    for case in sorted(zoo.CASES):
        row = []
        for method in methods:
            fn, x, tensors, kw, steps = zoo.CASES[case]()
            _, ref = zoo.adjoint_and_backprop_gradients(fn, x, tensors, adjoint=False, method=method, steps=steps, **kw)
            fn, x, tensors, kw, steps = zoo.CASES[case]()  # afresh: stateful velocities start alike
            _, adj = zoo.adjoint_and_backprop_gradients(fn, x, tensors, adjoint=True, method=method, steps=steps, **kw)
            name, err = zoo.worst_relative_error(adj, ref)
            worst = max(worst, err)
            row.append(f"{err:.1e}")
        print(f"| {case} | {' | '.join(row)} |")
    print(f"worst over all: {worst:.2e}")
    return 0 if worst < zoo.RTOL else 1


if __name__ == "__main__":
    sys.exit(main())
