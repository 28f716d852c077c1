"""The unit time interval of reverse/generate: t = 0 is data, t = 1 is noise (DESIGN.md section 2).

A trajectory read past either end runs the network on times it was never trained on, silently;
reverse and generate refuse it, and so does every layer above through the one parser of times
(prg_fast.classifier.parse_time / parse_times: the segment, the trainers' time fields, the command
line's --t / --t0 / --save-at), which calls check_unit_times. odeint takes any grid and does not
come here."""
from __future__ import annotations

import numbers

import torch

UNIT_TIME = "a time in [0, 1] (0 = data, 1 = noise)"


def check_unit_times(**times) -> None:
    """Every given time (a number, a sequence of numbers or a tensor of any shape; None skips) lies
    in [0, 1], else ValueError naming the argument and the first value outside. Numbers cost nothing;
    a tensor costs one host synchronisation (the bool of its range test) -- on CUDA the only one this
    adds, and reverse/generate already synchronise on a time tensor to check that it is finite."""
    for name, value in times.items():
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            values = value.detach().reshape(-1)
        elif isinstance(value, numbers.Real):
            if not 0.0 <= float(value) <= 1.0:  # in Python: a tensor per number cost ~50 us a call (NaN fails too)
                raise ValueError(f"{name}: expected {UNIT_TIME}, got {float(value):g}")
            continue
        else:  # a sequence of times; one that is not numbers is refused by the caller's own parsing
            try:
                values = torch.tensor([float(v) for v in value], dtype=torch.float64)
            except (TypeError, ValueError):
                continue
        outside = ~((values >= 0) & (values <= 1))  # NaN is outside too
        if bool(outside.any()):
            first = values[outside][0].item()
            raise ValueError(f"{name}: expected {UNIT_TIME}, got {first:g}")
