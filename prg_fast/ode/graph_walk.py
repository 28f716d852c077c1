"""The one walk over an autograd graph that discovery and the adjoints' checks share (what a graph
reads: discovery.discover_params, discovery.check_computed_inputs, rerun.unknown_reads)."""
import torch


def _accumulate_grad_type() -> type:
    """The type of the node autograd gives a leaf requiring grad (its `variable` is the leaf), read off
    a real one, whatever grad mode the import runs under: a type check is ~10x cheaper than
    getattr(node, "variable", None) on every other node, and the adjoint's checks walk every
    recomputed evaluation's graph."""
    with torch.inference_mode(False), torch.enable_grad():
        return type(torch.empty(0, requires_grad=True).expand(0).grad_fn.next_functions[0][0])


ACCUMULATE_GRAD = _accumulate_grad_type()


def leaf_of(node):
    """The leaf tensor an autograd node accumulates into (an AccumulateGrad's), or None."""
    return node.variable if type(node) is ACCUMULATE_GRAD else None


def graph_nodes(roots, stops=(), ends=()):
    """Each autograd node under `roots` once, depth first (the order the walks' first error is found
    in): not the `stops` nor what lies only under them; the `ends` but not what lies under them."""
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        yield node
        if node not in ends:
            for fn, _ in node.next_functions:  # (a loop, not a generator: the walk runs per evaluation)
                stack.append(fn)
