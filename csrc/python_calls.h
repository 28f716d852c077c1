// The Python functions of the module prg_fast._C (csrc/python_calls.cpp).
#pragma once
#include <Python.h>

namespace prg_fast {

// The method table of prg_fast._C: fast entry points to the operators (null-terminated).
PyMethodDef* python_methods();

}  // namespace prg_fast
