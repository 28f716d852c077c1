// An importable, empty Python module: importing prg_fast._C_cuda loads this shared library, and
// with it the CUDA kernels' TORCH_LIBRARY_IMPL registrations (stage_combine.cu). The operator
// schemas themselves live in prg_fast._C (csrc/prg_fast.cpp), which prg_fast.ops imports first.
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
