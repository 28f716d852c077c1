// Direct Python entry points to prg_fast::stage_combine and prg_fast::stage_combine_into, for the
// engine's per-call cost. Calling an operator through torch.ops boxes every argument into an
// IValue stack, looks for __torch_function__ overrides, releases and retakes the GIL and calls the
// kernel boxed: about 2.5 us per call on a 2^12-element state, as much as a whole torch.add. These
// entries read the arguments straight from the Python objects and call the operator through the
// dispatcher unboxed, so everything below Python -- the C++ autograd kernel, __torch_dispatch__
// modes, functorch, the device kernels -- runs exactly as for torch.ops.
//
// Only the common case is taken: exact torch.Tensor (or Parameter) arguments, a list or tuple of
// terms, Python float / int numbers, no __torch_function__ mode active. Anything else returns
// NotImplemented and the caller (prg_fast/ode/ops.py) goes through torch.ops, which then handles
// subclasses, modes and bad input with its own messages.
#include "python_calls.h"

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/version.h>

#include <optional>

#include "stage_combine.h"

namespace prg_fast {
namespace {

// From this many elements on the kernel runs with the GIL released (another Python thread may run
// meanwhile); below it, releasing and retaking the GIL would cost more than the kernel.
constexpr int64_t kReleaseGilFrom = 1 << 16;

using TermVector = c10::SmallVector<at::Tensor, kMaxTerms>;
using CoeffVector = c10::SmallVector<double, kMaxTerms>;

bool read_tensor(PyObject* obj, at::Tensor& out) {
  if (!THPVariable_CheckExact(obj)) return false;  // a subclass may override __torch_function__
  out = THPVariable_Unpack(obj);
  return true;
}

bool read_number(PyObject* obj, double& out) {
  if (PyFloat_CheckExact(obj)) {
    out = PyFloat_AS_DOUBLE(obj);
    return true;
  }
  if (!PyLong_CheckExact(obj)) return false;  // bool, numpy scalars, tensors: torch.ops decides
  out = PyLong_AsDouble(obj);
  if (out == -1.0 && PyErr_Occurred()) {  // too large for a double: torch.ops reports it
    PyErr_Clear();
    return false;
  }
  return true;
}

// Items of a list or tuple, or false for any other object (or more than kMaxTerms items: the
// kernel's own check then speaks through torch.ops).
template <typename T, typename Read>
bool read_sequence(PyObject* seq, c10::SmallVector<T, kMaxTerms>& out, Read read) {
  if (!PyList_CheckExact(seq) && !PyTuple_CheckExact(seq)) return false;
  PyObject* const* items = PySequence_Fast_ITEMS(seq);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  if (n > kMaxTerms) return false;
  out.resize(n);
  for (Py_ssize_t j = 0; j < n; ++j) {
    if (!read(items[j], out[j])) return false;
  }
  return true;
}

// __torch_function__ modes (and the one-hop skip flag) are handled in torch.ops' Python layer.
// The skip flag is new in torch 2.13 (PythonTorchFunctionTLS::peek_skip_next); before it there is
// no such flag, and an active mode is the whole condition.
bool torch_function_active() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
  return at::impl::torch_function_mode_enabled() ||
         at::impl::PythonTorchFunctionTLS::peek_skip_next();
#else
  return at::impl::torch_function_mode_enabled();
#endif
}

struct CombineArgs {
  at::Tensor base;
  TermVector terms;
  CoeffVector coeffs;
  double alpha = 1.0;
};

// base, terms, coeffs, alpha: the first four arguments of both operators.
bool read_combine_args(PyObject* const* args, CombineArgs& a) {
  return read_tensor(args[0], a.base) && read_sequence(args[1], a.terms, read_tensor) &&
         read_sequence(args[2], a.coeffs, read_number) && read_number(args[3], a.alpha);
}

PyObject* not_handled() { Py_RETURN_NOTIMPLEMENTED; }

// stage_combine(base, terms, coeffs, alpha, out_dtype) -> Tensor, or NotImplemented.
PyObject* stage_combine(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  CombineArgs a;
  if (nargs != 5 || torch_function_active() || !read_combine_args(args, a)) return not_handled();
  std::optional<at::ScalarType> out_dtype;
  if (THPDtype_Check(args[4])) {
    out_dtype = reinterpret_cast<THPDtype*>(args[4])->scalar_type;
  } else if (args[4] != Py_None) {
    return not_handled();
  }
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("prg_fast::stage_combine", "")
          .typed<at::Tensor(const at::Tensor&, at::TensorList, at::ArrayRef<double>, double,
                            std::optional<at::ScalarType>)>();
  at::Tensor result;
  if (a.base.numel() >= kReleaseGilFrom) {
    pybind11::gil_scoped_release no_gil;
    result = op.call(a.base, a.terms, a.coeffs, a.alpha, out_dtype);
  } else {
    result = op.call(a.base, a.terms, a.coeffs, a.alpha, out_dtype);
  }
  return THPVariable_Wrap(std::move(result));
  END_HANDLE_TH_ERRORS
}

// stage_combine_into(base, terms, coeffs, alpha, out) -> None, or NotImplemented.
PyObject* stage_combine_into(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  CombineArgs a;
  at::Tensor out;
  if (nargs != 5 || torch_function_active() || !read_combine_args(args, a) ||
      !read_tensor(args[4], out)) {
    return not_handled();
  }
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("prg_fast::stage_combine_into", "")
          .typed<void(const at::Tensor&, at::TensorList, at::ArrayRef<double>, double,
                      const at::Tensor&)>();
  if (a.base.numel() >= kReleaseGilFrom) {
    pybind11::gil_scoped_release no_gil;
    op.call(a.base, a.terms, a.coeffs, a.alpha, out);
  } else {
    op.call(a.base, a.terms, a.coeffs, a.alpha, out);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"stage_combine", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(stage_combine)),
     METH_FASTCALL,
     "stage_combine(base, terms, coeffs, alpha, out_dtype): torch.ops.prg_fast.stage_combine for "
     "plain tensors and numbers, else NotImplemented"},
    {"stage_combine_into",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(stage_combine_into)), METH_FASTCALL,
     "stage_combine_into(base, terms, coeffs, alpha, out): torch.ops.prg_fast.stage_combine_into "
     "for plain tensors and numbers, else NotImplemented"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* python_methods() { return kMethods; }

}  // namespace prg_fast
