// CUDA kernel for prg_fast::stage_combine_rows (per-row coefficients):
//     out[b] = coeffs[r, 0] * base[b] + sum_j coeffs[r, j + 1] * terms[j][b],  r = b or 0
// Semantics, validation and rounding order are the CPU kernel's (csrc/cpu/stage_combine.cpp):
// acc = sum_j c_j * term_j for j = 1, 2, ... in order; out = static_cast<out_t>(c0 * base + acc).
//
// One grid-stride scalar pass. Element dtypes are read at run time (one switch per load, uniform
// across the warp), so only two kernels are compiled (float32 and float64 accumulation): per-sample
// time intervals are the less common path, and compile time matters more here than the last
// few percent of bandwidth.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../stage_combine.h"

namespace prg_fast {
namespace {

constexpr int kRowsThreads = 256;

enum Kind : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

inline int kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    default: return kBF16;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t load_as(const void* p, int kind, int64_t i) {
  switch (kind) {
    case kF32: return static_cast<acc_t>(static_cast<const float*>(p)[i]);
    case kF64: return static_cast<acc_t>(static_cast<const double*>(p)[i]);
    case kF16: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(p)[i]));
    default: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]));
  }
}

template <typename acc_t>
__device__ __forceinline__ void store_as(void* p, int kind, int64_t i, acc_t v) {
  switch (kind) {
    case kF32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case kF64: static_cast<double*>(p)[i] = static_cast<double>(v); break;
    // Through float32, like PyTorch's casts (and the CPU kernel's c10 conversions).
    case kF16: static_cast<c10::Half*>(p)[i] = c10::Half(static_cast<float>(v)); break;
    default: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(static_cast<float>(v)); break;
  }
}

struct RowsParams {
  const void* terms[kMaxTerms];
  int n_terms;
  int base_kind, term_kind, out_kind;
};

template <typename acc_t>
__global__ void rows_kernel(const void* base, void* out, const acc_t* coeffs, int64_t n,
                            int64_t inner, int64_t row_step, RowsParams p) {
  const int64_t width = p.n_terms + 1;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t* c = coeffs + (i / inner) * row_step * width;
    acc_t acc = acc_t(0);
    for (int j = 0; j < p.n_terms; ++j) acc += c[j + 1] * load_as<acc_t>(p.terms[j], p.term_kind, i);
    store_as<acc_t>(out, p.out_kind, i, c[0] * load_as<acc_t>(base, p.base_kind, i) + acc);
  }
}

at::Tensor stage_combine_rows_cuda(const at::Tensor& base, at::TensorList terms,
                                   const at::Tensor& coeffs,
                                   std::optional<at::ScalarType> out_dtype) {
  check_stage_combine_rows_inputs(base, terms, coeffs, out_dtype);
  TORCH_CHECK(base.device().is_cuda(), "stage_combine_rows (CUDA kernel): base must be on CUDA");
  const c10::cuda::CUDAGuard guard(base.device());
  const at::ScalarType dtype = out_dtype.value_or(base.scalar_type());
  const at::Tensor base_c = base.contiguous();
  std::vector<at::Tensor> terms_c;
  terms_c.reserve(terms.size());
  for (const auto& t : terms) terms_c.push_back(t.contiguous());
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(dtype));
  const int64_t n = base.numel();
  if (n == 0) return out;
  RowsParams p{};
  p.n_terms = static_cast<int>(terms_c.size());
  for (size_t j = 0; j < terms_c.size(); ++j) p.terms[j] = terms_c[j].const_data_ptr();
  p.base_kind = kind_of(base.scalar_type());
  p.term_kind = terms_c.empty() ? p.base_kind : kind_of(terms_c[0].scalar_type());
  p.out_kind = kind_of(dtype);
  const int64_t inner = n / base.size(0);
  const int64_t row_step = coeffs.size(0) == 1 ? 0 : 1;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((n + kRowsThreads - 1) / kRowsThreads, int64_t(sms) * 8);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (accumulate_in_double(base, terms, dtype) || coeffs.scalar_type() == at::kDouble) {
    const at::Tensor c = coeffs.to(at::kDouble).contiguous();
    rows_kernel<double><<<blocks, kRowsThreads, 0, stream>>>(
        base_c.const_data_ptr(), out.mutable_data_ptr(), c.const_data_ptr<double>(), n, inner,
        row_step, p);
  } else {
    const at::Tensor c = coeffs.contiguous();
    rows_kernel<float><<<blocks, kRowsThreads, 0, stream>>>(
        base_c.const_data_ptr(), out.mutable_data_ptr(), c.const_data_ptr<float>(), n, inner,
        row_step, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(prg_fast, CUDA, m) { m.impl("stage_combine_rows", &stage_combine_rows_cuda); }

}  // namespace prg_fast
