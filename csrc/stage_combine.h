// Input validation and dtype rules shared by every device's stage_combine kernel, so the CPU and
// CUDA builds reject the same inputs with the same messages.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <optional>
#include <string>

namespace prg_fast {

// Kernels accept at most this many terms per call (a fixed parameter block); prg_fast.ode.backends
// chains longer sums, for every backend, through a partial sum in the accumulation dtype.
constexpr int64_t kMaxTerms = 8;

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_stage_combine_inputs(const at::Tensor& base, at::TensorList terms,
                                       at::ArrayRef<double> coeffs,
                                       std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(is_supported_float(base.scalar_type()),
              "stage_combine: base must be float32, float64, float16 or bfloat16, got ",
              base.scalar_type());
  TORCH_CHECK(static_cast<int64_t>(terms.size()) == static_cast<int64_t>(coeffs.size()),
              "stage_combine: coeffs must have one entry per term, got ", coeffs.size(),
              " coeffs for ", terms.size(), " terms");
  TORCH_CHECK(static_cast<int64_t>(terms.size()) <= kMaxTerms, "stage_combine: at most ",
              kMaxTerms, " terms per call, got ", terms.size());
  for (size_t j = 0; j < terms.size(); ++j) {
    const auto& t = terms[j];
    TORCH_CHECK(t.device() == base.device(), "stage_combine: terms[", j, "] is on ", t.device(),
                " but base is on ", base.device());
    TORCH_CHECK(t.sizes() == base.sizes(), "stage_combine: terms[", j, "] has shape ", t.sizes(),
                " but base has shape ", base.sizes());
    TORCH_CHECK(is_supported_float(t.scalar_type()), "stage_combine: terms[", j,
                "] must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
    TORCH_CHECK(t.scalar_type() == terms[0].scalar_type(),
                "stage_combine: all terms must share one dtype, terms[0] is ",
                terms[0].scalar_type(), " and terms[", j, "] is ", t.scalar_type());
  }
  if (out_dtype.has_value()) {
    TORCH_CHECK(is_supported_float(*out_dtype),
                "stage_combine: out_dtype must be float32, float64, float16 or bfloat16, got ",
                *out_dtype);
  }
}

// The caller's output of stage_combine_into: base's shape and device, dense, and either the very
// memory of an input (an in-place update: every element is read before it is written) or apart
// from all of them.
inline void check_stage_combine_out(const at::Tensor& base, at::TensorList terms,
                                    const at::Tensor& out) {
  TORCH_CHECK(out.device() == base.device(), "stage_combine_into: out is on ", out.device(),
              " but base is on ", base.device());
  TORCH_CHECK(out.sizes() == base.sizes(), "stage_combine_into: out has shape ", out.sizes(),
              " but base has shape ", base.sizes());
  TORCH_CHECK(is_supported_float(out.scalar_type()),
              "stage_combine_into: out must be float32, float64, float16 or bfloat16, got ",
              out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "stage_combine_into: out must be contiguous");
  const auto apart_or_same = [&](const at::Tensor& input, const char* name, int64_t j) {
    const at::MemOverlapStatus status = at::get_overlap_status(out, input);
    TORCH_CHECK(status == at::MemOverlapStatus::No || status == at::MemOverlapStatus::Full,
                "stage_combine_into: out partly overlaps ", name, j >= 0 ? "[" : "",
                j >= 0 ? std::to_string(j) : "", j >= 0 ? "]" : "",
                "; out must be that input itself (an in-place update) or memory apart from it");
  };
  apart_or_same(base, "base", -1);
  for (size_t j = 0; j < terms.size(); ++j) apart_or_same(terms[j], "terms", static_cast<int64_t>(j));
}

// Accumulate in float64 when anything involved is float64, else in float32.
inline bool accumulate_in_double(const at::Tensor& base, at::TensorList terms,
                                 at::ScalarType out_dtype) {
  if (base.scalar_type() == at::kDouble || out_dtype == at::kDouble) return true;
  return !terms.empty() && terms[0].scalar_type() == at::kDouble;
}

inline void check_stage_combine_rows_inputs(const at::Tensor& base, at::TensorList terms,
                                            const at::Tensor& coeffs,
                                            std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(is_supported_float(base.scalar_type()),
              "stage_combine_rows: base must be float32, float64, float16 or bfloat16, got ",
              base.scalar_type());
  TORCH_CHECK(base.dim() >= 1, "stage_combine_rows: base must have a batch (row) dimension, got a ",
              "0-dimensional tensor");
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat || coeffs.scalar_type() == at::kDouble,
              "stage_combine_rows: coeffs must be float32 or float64, got ", coeffs.scalar_type());
  TORCH_CHECK(coeffs.device() == base.device(), "stage_combine_rows: coeffs is on ",
              coeffs.device(), " but base is on ", base.device());
  const int64_t n = static_cast<int64_t>(terms.size());
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(1) == 1 + n &&
                  (coeffs.size(0) == base.size(0) || coeffs.size(0) == 1),
              "stage_combine_rows: coeffs must have shape (B, 1 + len(terms)) or (1, 1 + len(terms)) ",
              "with B = base.size(0) = ", base.size(0), " and len(terms) = ", n, ", got ",
              coeffs.sizes());
  TORCH_CHECK(n <= kMaxTerms, "stage_combine_rows: at most ", kMaxTerms, " terms per call, got ", n);
  for (size_t j = 0; j < terms.size(); ++j) {
    const auto& t = terms[j];
    TORCH_CHECK(t.device() == base.device(), "stage_combine_rows: terms[", j, "] is on ",
                t.device(), " but base is on ", base.device());
    TORCH_CHECK(t.sizes() == base.sizes(), "stage_combine_rows: terms[", j, "] has shape ",
                t.sizes(), " but base has shape ", base.sizes());
    TORCH_CHECK(is_supported_float(t.scalar_type()), "stage_combine_rows: terms[", j,
                "] must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
    TORCH_CHECK(t.scalar_type() == terms[0].scalar_type(),
                "stage_combine_rows: all terms must share one dtype, terms[0] is ",
                terms[0].scalar_type(), " and terms[", j, "] is ", t.scalar_type());
  }
  if (out_dtype.has_value()) {
    TORCH_CHECK(is_supported_float(*out_dtype),
                "stage_combine_rows: out_dtype must be float32, float64, float16 or bfloat16, got ",
                *out_dtype);
  }
}

// Calls f with a value of the C++ type of t, one of float32 / float16 / bfloat16: the element
// types the kernels instantiate for float32 accumulation.
template <typename F>
void with_reduced_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "stage_combine: no float32-accumulation kernel for dtype ", t);
  }
}

// A device's kernel: out = alpha * base + sum_j coeffs[j] * terms[j] written into a dense `out`
// of base's shape (validated by the entry points below).
using CombineInto = void (*)(const at::Tensor& base, at::TensorList terms,
                             at::ArrayRef<double> coeffs, double alpha, at::Tensor& out);

inline void check_device(const at::Tensor& base, c10::DeviceType device, const char* op) {
  TORCH_CHECK(base.device().type() == device, op, " (", c10::DeviceTypeName(device),
              " kernel): base must be on a ", c10::DeviceTypeName(device), " device, got ",
              base.device());
}

// The operators prg_fast::stage_combine and prg_fast::stage_combine_into of one device, from its
// kernel: the same validation and allocation for every device.
template <CombineInto combine_into, c10::DeviceType kDevice>
at::Tensor stage_combine_on(const at::Tensor& base, at::TensorList terms,
                            at::ArrayRef<double> coeffs, double alpha,
                            std::optional<at::ScalarType> out_dtype) {
  check_stage_combine_inputs(base, terms, coeffs, out_dtype);
  check_device(base, kDevice, "stage_combine");
  // at::empty leaves the memory as it is (no zero fill): the kernel writes every element.
  at::Tensor out =
      at::empty(base.sizes(), base.options().dtype(out_dtype.value_or(base.scalar_type())));
  combine_into(base, terms, coeffs, alpha, out);
  return out;
}

template <CombineInto combine_into, c10::DeviceType kDevice>
void stage_combine_into_on(const at::Tensor& base, at::TensorList terms,
                           at::ArrayRef<double> coeffs, double alpha, const at::Tensor& out) {
  check_stage_combine_inputs(base, terms, coeffs, out.scalar_type());
  check_device(base, kDevice, "stage_combine_into");
  check_stage_combine_out(base, terms, out);
  at::Tensor target = out;  // the schema's Tensor(a!): written in place
  combine_into(base, terms, coeffs, alpha, target);
}

}  // namespace prg_fast
