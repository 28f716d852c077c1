"""The quick CUDA subset (`pytest -m cuda_quick`): the one place where it is chosen.

`pytest -m cuda` runs every CUDA test (a few minutes on an H200: every dtype mix x term count x
size of every kernel). The GPU report (benchmarks/gpu_report.py) has about a minute for
correctness, so it runs a subset chosen by one rule, applied per test function: the fewest
parametrizations such that every value of every parameter appears at least once (greedy set cover,
in collection order). Every op, dtype, size, term count, method and strategy is then run once, but
not every combination. Tests without parameters are kept whole. conftest.py marks the chosen items
`cuda_quick` at collection.
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Sequence, Tuple

QUICK_MARK = "cuda_quick"


def _value_key(value) -> Hashable:
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def cover(param_sets: Sequence[Dict[str, object]]) -> List[int]:
    """Indices of a small subset of `param_sets` (the parametrizations of one test function) in
    which every (parameter, value) pair of the whole set occurs: greedy, the first index that
    covers the most pairs still missing, ties to the earlier one (deterministic)."""
    pairs = [{(name, _value_key(v)) for name, v in ps.items()} for ps in param_sets]
    missing = set().union(*pairs) if pairs else set()
    chosen: List[int] = []
    while missing:
        best = max(range(len(pairs)), key=lambda i: (len(pairs[i] & missing), -i))
        chosen.append(best)
        missing -= pairs[best]
    if not chosen and param_sets:
        chosen.append(0)  # a function whose parametrizations carry no values still runs once
    return sorted(chosen)


def quick_items(items) -> list:
    """The pytest items of the quick subset among the `cuda`-marked `items`."""
    groups: Dict[Tuple[str, str], list] = {}
    for item in items:
        if item.get_closest_marker("cuda") is None:
            continue
        key = (item.nodeid.split("::")[0], getattr(item, "originalname", item.name))
        groups.setdefault(key, []).append(item)
    chosen = []
    for group in groups.values():
        params = [dict(getattr(getattr(it, "callspec", None), "params", {})) for it in group]
        chosen += [group[i] for i in cover(params)]
    return chosen
