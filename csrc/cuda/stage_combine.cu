// CUDA kernel for prg_fast::stage_combine:
//     out = alpha * base + sum_j coeffs[j] * terms[j]
// accumulated in float32 (float64 when anything involved is float64) and written in out_dtype.
// Semantics, validation and rounding order are the CPU kernel's (csrc/cpu/stage_combine.cpp):
// acc = sum_j c_j * term_j for j = 0, 1, ... in order; out = static_cast<out_t>(alpha * base + acc)
// (the base last: the increment rounds at its own scale, not the state's once per term).
//
// One grid-stride pass over memory. When every pointer is 16-byte aligned each thread moves VEC
// elements with 128-bit loads/stores (VEC = 16 bytes / the smallest element size involved), and
// the last numel % VEC elements go through a scalar tail in the same launch; otherwise the whole
// launch is scalar. Indices are int64, so any size works.
//
// Instantiations (compile time matters): the 27 (base, term, out) combinations of
// {float32, float16, bfloat16} with float32 accumulation, the all-float64 case, and one
// runtime-typed kernel with float64 accumulation for every other mix that involves float64
// (rare: only float64 states mixed with lower-precision tensors).
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

constexpr int kThreads = 256;
// Resident blocks per SM the grid is sized for (2048 threads / SM on sm_80 and sm_90).
constexpr int kBlocksPerSM = 8;

// Everything but the base and output pointers, passed by value in the kernel's parameter space.
template <typename acc_t>
struct CombineParams {
  const void* terms[kMaxTerms];
  acc_t coeffs[kMaxTerms];
  acc_t alpha;
  int n_terms;
};

// VEC elements of T, aligned so the pack moves as whole 128-bit words.
template <typename T, int VEC>
struct alignas(16) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* src) {
  static_assert((VEC * sizeof(T)) % 16 == 0, "a pack must be a whole number of 128-bit words");
  constexpr int kWords = VEC * sizeof(T) / 16;
  Pack<T, VEC> pack;
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(&pack);
#pragma unroll
  for (int w = 0; w < kWords; ++w) d[w] = __ldg(s + w);
  return pack;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* dst, const Pack<T, VEC>& pack) {
  constexpr int kWords = VEC * sizeof(T) / 16;
  uint4* d = reinterpret_cast<uint4*>(dst);
  const uint4* s = reinterpret_cast<const uint4*>(&pack);
#pragma unroll
  for (int w = 0; w < kWords; ++w) d[w] = s[w];
}

template <typename base_t, typename term_t, typename out_t>
constexpr int vec_width() {
  constexpr size_t smallest = std::min(sizeof(base_t), std::min(sizeof(term_t), sizeof(out_t)));
  return static_cast<int>(16 / smallest);
}

template <typename base_t, typename term_t, typename out_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    stage_combine_kernel(const base_t* __restrict__ base, out_t* __restrict__ out,
                         const CombineParams<acc_t> p, const int64_t n, const int64_t n_packs) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  // Vectorised body: n_packs packs of VEC elements (n_packs == 0 when a pointer is misaligned).
  for (int64_t k = tid; k < n_packs; k += stride) {
    const int64_t i = k * VEC;
    acc_t acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = acc_t(0);
#pragma unroll
    for (int j = 0; j < kMaxTerms; ++j) {
      if (j < p.n_terms) {
        const Pack<term_t, VEC> t =
            load_pack<term_t, VEC>(static_cast<const term_t*>(p.terms[j]) + i);
        const acc_t c = p.coeffs[j];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += c * static_cast<acc_t>(t.v[e]);
      }
    }
    {
      const Pack<base_t, VEC> b = load_pack<base_t, VEC>(base + i);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = p.alpha * static_cast<acc_t>(b.v[e]) + acc[e];
    }
    Pack<out_t, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.v[e] = static_cast<out_t>(acc[e]);
    store_pack<out_t, VEC>(out + i, o);
  }

  // Scalar tail (or everything, when not vectorised).
  for (int64_t i = n_packs * VEC + tid; i < n; i += stride) {
    acc_t acc = acc_t(0);
#pragma unroll
    for (int j = 0; j < kMaxTerms; ++j) {
      if (j < p.n_terms) {
        acc += p.coeffs[j] * static_cast<acc_t>(static_cast<const term_t*>(p.terms[j])[i]);
      }
    }
    out[i] = static_cast<out_t>(p.alpha * static_cast<acc_t>(base[i]) + acc);
  }
}

// Mixes that involve float64 but are not all-float64: dtypes are read at run time (a switch that is
// uniform across the grid), accumulation in float64. Scalar, since this path is rare.
enum DtypeCode : int { kCodeF32 = 0, kCodeF64 = 1, kCodeF16 = 2, kCodeBF16 = 3 };

struct GenericParams {
  const void* terms[kMaxTerms];
  double coeffs[kMaxTerms];
  double alpha;
  int n_terms;
  int base_code;
  int term_code;
  int out_code;
};

__device__ __forceinline__ double load_as_double(const void* p, int64_t i, int code) {
  switch (code) {
    case kCodeF32:
      return static_cast<double>(static_cast<const float*>(p)[i]);
    case kCodeF64:
      return static_cast<const double*>(p)[i];
    case kCodeF16:
      return static_cast<double>(static_cast<const c10::Half*>(p)[i]);
    default:
      return static_cast<double>(static_cast<const c10::BFloat16*>(p)[i]);
  }
}

__device__ __forceinline__ void store_from_double(void* p, int64_t i, int code, double v) {
  // static_cast<out_t>(double), exactly as the CPU kernel's store.
  switch (code) {
    case kCodeF32:
      static_cast<float*>(p)[i] = static_cast<float>(v);
      break;
    case kCodeF64:
      static_cast<double*>(p)[i] = v;
      break;
    case kCodeF16:
      static_cast<c10::Half*>(p)[i] = static_cast<c10::Half>(v);
      break;
    default:
      static_cast<c10::BFloat16*>(p)[i] = static_cast<c10::BFloat16>(v);
      break;
  }
}

__global__ void __launch_bounds__(kThreads)
    stage_combine_generic_kernel(const void* base, void* out, const GenericParams p,
                                 const int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    double acc = 0.0;
#pragma unroll
    for (int j = 0; j < kMaxTerms; ++j) {
      if (j < p.n_terms) acc += p.coeffs[j] * load_as_double(p.terms[j], i, p.term_code);
    }
    store_from_double(out, i, p.out_code, p.alpha * load_as_double(base, i, p.base_code) + acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

int64_t grid_size(int64_t work_items) {
  const int64_t wanted = (work_items + kThreads - 1) / kThreads;
  const int64_t resident =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
      kBlocksPerSM;
  return std::max<int64_t>(1, std::min(wanted, resident));
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <typename base_t, typename term_t, typename out_t, typename acc_t>
void launch_combine(const at::Tensor& base, const std::vector<at::Tensor>& terms,
                    at::ArrayRef<double> coeffs, double alpha, at::Tensor& out) {
  constexpr int VEC = vec_width<base_t, term_t, out_t>();
  CombineParams<acc_t> p{};
  p.alpha = static_cast<acc_t>(alpha);
  p.n_terms = static_cast<int>(terms.size());
  const base_t* base_ptr = base.const_data_ptr<base_t>();
  out_t* out_ptr = out.mutable_data_ptr<out_t>();
  bool aligned = aligned16(base_ptr) && aligned16(out_ptr);
  for (size_t j = 0; j < terms.size(); ++j) {
    p.terms[j] = terms[j].const_data_ptr<term_t>();
    p.coeffs[j] = static_cast<acc_t>(coeffs[j]);
    aligned = aligned && aligned16(p.terms[j]);
  }
  const int64_t n = base.numel();
  const int64_t n_packs = aligned ? n / VEC : 0;
  const int64_t work = n_packs + (n - n_packs * VEC);
  stage_combine_kernel<base_t, term_t, out_t, acc_t, VEC>
      <<<static_cast<unsigned int>(grid_size(work)), kThreads, 0,
         at::cuda::getCurrentCUDAStream()>>>(base_ptr, out_ptr, p, n, n_packs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kCodeF32;
    case at::kDouble:
      return kCodeF64;
    case at::kHalf:
      return kCodeF16;
    case at::kBFloat16:
      return kCodeBF16;
    default:
      TORCH_CHECK(false, "stage_combine (CUDA kernel): unsupported dtype ", t);
  }
  return kCodeF32;  // unreachable
}

void launch_generic_double(const at::Tensor& base, const std::vector<at::Tensor>& terms,
                           at::ArrayRef<double> coeffs, double alpha, at::Tensor& out) {
  GenericParams p{};
  p.alpha = alpha;
  p.n_terms = static_cast<int>(terms.size());
  p.base_code = dtype_code(base.scalar_type());
  p.term_code = terms.empty() ? p.base_code : dtype_code(terms[0].scalar_type());
  p.out_code = dtype_code(out.scalar_type());
  for (size_t j = 0; j < terms.size(); ++j) {
    p.terms[j] = terms[j].const_data_ptr();
    p.coeffs[j] = coeffs[j];
  }
  const int64_t n = base.numel();
  stage_combine_generic_kernel<<<static_cast<unsigned int>(grid_size(n)), kThreads, 0,
                                 at::cuda::getCurrentCUDAStream()>>>(
      base.const_data_ptr(), out.mutable_data_ptr(), p, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out = alpha * base + sum_j coeffs[j] * terms[j] into `out` (dense; checked by the callers).
void combine_into_cuda(const at::Tensor& base, at::TensorList terms, at::ArrayRef<double> coeffs,
                       double alpha, at::Tensor& out) {
  if (base.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(base.device());
  // Non-contiguous inputs are accepted; the kernel reads dense copies of them.
  const at::Tensor base_c = base.contiguous();
  std::vector<at::Tensor> terms_c;
  terms_c.reserve(terms.size());
  for (const auto& t : terms) terms_c.push_back(t.contiguous());
  const at::ScalarType dtype = out.scalar_type();
  const at::ScalarType base_dtype = base.scalar_type();
  const at::ScalarType term_dtype = terms.empty() ? base_dtype : terms[0].scalar_type();
  if (accumulate_in_double(base, terms, dtype)) {
    if (base_dtype == at::kDouble && term_dtype == at::kDouble && dtype == at::kDouble) {
      launch_combine<double, double, double, double>(base_c, terms_c, coeffs, alpha, out);
    } else {
      launch_generic_double(base_c, terms_c, coeffs, alpha, out);
    }
    return;
  }
  with_reduced_type(base_dtype, [&](auto base_tag) {
    with_reduced_type(term_dtype, [&](auto term_tag) {
      with_reduced_type(dtype, [&](auto out_tag) {
        launch_combine<decltype(base_tag), decltype(term_tag), decltype(out_tag), float>(
            base_c, terms_c, coeffs, alpha, out);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(prg_fast, CUDA, m) {
  m.impl("stage_combine", &stage_combine_on<combine_into_cuda, c10::DeviceType::CUDA>);
  m.impl("stage_combine_into", &stage_combine_into_on<combine_into_cuda, c10::DeviceType::CUDA>);
}

}  // namespace prg_fast
