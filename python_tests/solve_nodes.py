"""Finding a solve's backward node in the graph of its output, where tests read what the adjoint
chose (`.evals`: the budget, graph bytes, kept count, tail) and what it saved."""


def adjoint_node(out):
    """The AdjointSolveBackward node behind `out` (through the views and reshapes after the solve)."""
    node = out.grad_fn
    while node is not None and "AdjointSolve" not in type(node).__name__:
        node = node.next_functions[0][0]
    assert node is not None, "no AdjointSolve node in the output's graph"
    return node
