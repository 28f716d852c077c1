"""The one walk over an autograd graph that discovery and the adjoints' checks share (what a graph
reads: discovery.discover_params, discovery.check_computed_inputs, rerun.unknown_reads)."""


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
            stack.extend(fn for fn, _ in node.next_functions)
