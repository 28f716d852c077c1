"""Triton kernels of prg_fast and the stage-combination operators' fake/autograd/vmap rules.

    prg_fast.kernels.stage_combine   the fused Runge-Kutta stage arithmetic
                                     (operator prg_fast::stage_combine_triton)

Importing this package never needs Triton; each kernel module sets `IMPORT_ERROR` (a sentence
saying why) when it cannot provide its kernels, and `prg_fast.ode.backends` reports it.
"""
