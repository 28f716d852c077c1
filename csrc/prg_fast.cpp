// The one place where prg_fast's operator signatures are declared. Kernels for each device
// register against these names with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda); Python adds the
// fake (meta) kernels and the autograd formula in prg_fast/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "python_calls.h"

// The Python module prg_fast._C: importing it loads this shared library, and with it the
// TORCH_LIBRARY registration below. Its functions are fast entry points to two of the operators
// (csrc/python_calls.cpp); everything else goes through torch.ops.prg_fast.*.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          prg_fast::python_methods()};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(prg_fast, m) {
  // out = alpha * base + sum_j coeffs[j] * terms[j], accumulated in float32 (float64 when any
  // input is float64) and written in out_dtype (default: base's dtype).
  // Every Runge-Kutta combination is one call: a stage input x + h*sum_j a_ij k_j, the step's
  // final combination x + h*sum_i b_i k_i, and the adjoint's cotangents
  // g_i = h*b_i*lambda + h*sum_m a_mi mu_m and lambda' = lambda + sum_i mu_i.
  m.def("stage_combine(Tensor base, Tensor[] terms, float[] coeffs, float alpha=1.0, "
        "ScalarType? out_dtype=None) -> Tensor");
  // The same sum written into a tensor the caller owns (its dtype is the output dtype): no
  // allocation, and no page faults of a fresh output, for loops that reuse their buffers. `out`
  // may be base or one of the terms itself (an in-place update) but must not partly overlap them.
  // No autograd: a call whose inputs require grad under grad mode is refused (use stage_combine).
  m.def("stage_combine_into(Tensor base, Tensor[] terms, float[] coeffs, float alpha, "
        "Tensor(a!) out) -> ()");
  // Per-row (per-sample) coefficients: coeffs has shape (R, 1 + len(terms)) with R == B (row b
  // uses coeffs[b]) or R == 1 (one row for all), B = base.size(0):
  //   out[b] = coeffs[r, 0] * base[b] + sum_j coeffs[r, j + 1] * terms[j][b].
  // Accumulated in float64 when base, the terms, out_dtype or coeffs is float64, else float32.
  // Per-sample step sizes (one time interval per sample) make every stage combination this call.
  m.def("stage_combine_rows(Tensor base, Tensor[] terms, Tensor coeffs, "
        "ScalarType? out_dtype=None) -> Tensor");
}
