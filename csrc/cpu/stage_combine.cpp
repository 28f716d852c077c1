// CPU kernel for prg_fast::stage_combine: one pass over memory, parallel over elements, with the
// inner loops compiled for AVX-512 / AVX2 / baseline and picked at run time (target_clones), so a
// wheel built anywhere uses the vector units of the machine it runs on.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../stage_combine.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PRG_FAST_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PRG_FAST_VECTOR_CLONES
#endif

namespace prg_fast {
namespace {

// Elements per chunk: the float accumulator of one chunk (16 KiB) stays in L1 while every input
// streams through it once.
constexpr int64_t kChunk = 4096;
// Below this many elements per thread, threading costs more than it saves.
constexpr int64_t kGrain = 32768;

template <typename acc_t, typename src_t>
PRG_FAST_VECTOR_CLONES void scale_into(acc_t* __restrict acc, const src_t* __restrict src,
                                       acc_t c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] = c * static_cast<acc_t>(src[i]);
}

template <typename acc_t, typename src_t>
PRG_FAST_VECTOR_CLONES void axpy_into(acc_t* __restrict acc, const src_t* __restrict src,
                                      acc_t c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += c * static_cast<acc_t>(src[i]);
}

template <typename acc_t, typename dst_t>
PRG_FAST_VECTOR_CLONES void store_from(dst_t* __restrict dst, const acc_t* __restrict acc,
                                       int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<dst_t>(acc[i]);
}

template <typename acc_t>
void combine(const at::Tensor& base, const std::vector<at::Tensor>& terms,
             at::ArrayRef<double> coeffs, double alpha, at::Tensor& out) {
  const int64_t n = base.numel();
  const at::ScalarType term_dtype = terms.empty() ? base.scalar_type() : terms[0].scalar_type();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    acc_t acc[kChunk];
    for (int64_t start = begin; start < end; start += kChunk) {
      const int64_t len = std::min(kChunk, end - start);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(),
                                      "stage_combine_base", [&] {
        scale_into<acc_t, scalar_t>(acc, base.const_data_ptr<scalar_t>() + start,
                                    static_cast<acc_t>(alpha), len);
      });
      for (size_t j = 0; j < terms.size(); ++j) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, term_dtype,
                                        "stage_combine_term", [&] {
          axpy_into<acc_t, scalar_t>(acc, terms[j].const_data_ptr<scalar_t>() + start,
                                     static_cast<acc_t>(coeffs[j]), len);
        });
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(),
                                      "stage_combine_out", [&] {
        store_from<acc_t, scalar_t>(out.mutable_data_ptr<scalar_t>() + start, acc, len);
      });
    }
  });
}

at::Tensor stage_combine_cpu(const at::Tensor& base, at::TensorList terms,
                             at::ArrayRef<double> coeffs, double alpha,
                             std::optional<at::ScalarType> out_dtype) {
  check_stage_combine_inputs(base, terms, coeffs, out_dtype);
  TORCH_CHECK(base.device().is_cpu(), "stage_combine (CPU kernel): base must be on the CPU");
  const at::ScalarType dtype = out_dtype.value_or(base.scalar_type());
  // Non-contiguous inputs are accepted; the kernel reads dense copies of them.
  const at::Tensor base_c = base.contiguous();
  std::vector<at::Tensor> terms_c;
  terms_c.reserve(terms.size());
  for (const auto& t : terms) terms_c.push_back(t.contiguous());
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(dtype));
  if (base.numel() == 0) return out;
  if (accumulate_in_double(base, terms, dtype)) {
    combine<double>(base_c, terms_c, coeffs, alpha, out);
  } else {
    combine<float>(base_c, terms_c, coeffs, alpha, out);
  }
  return out;
}

// Per-row coefficients: a chunk never crosses a row boundary, so each chunk reads one row of
// coeffs (already converted to acc_t, contiguous (R, 1 + n)).
template <typename acc_t>
void combine_rows(const at::Tensor& base, const std::vector<at::Tensor>& terms,
                  const acc_t* coeffs, int64_t n_rows_coeffs, at::Tensor& out) {
  const int64_t n = base.numel();
  const int64_t inner = n / base.size(0);
  const int64_t width = 1 + static_cast<int64_t>(terms.size());
  const at::ScalarType term_dtype = terms.empty() ? base.scalar_type() : terms[0].scalar_type();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    acc_t acc[kChunk];
    for (int64_t start = begin; start < end;) {
      const int64_t row = start / inner;
      const int64_t len = std::min({kChunk, end - start, (row + 1) * inner - start});
      const acc_t* c = coeffs + (n_rows_coeffs == 1 ? 0 : row) * width;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(),
                                      "stage_combine_rows_base", [&] {
        scale_into<acc_t, scalar_t>(acc, base.const_data_ptr<scalar_t>() + start, c[0], len);
      });
      for (size_t j = 0; j < terms.size(); ++j) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, term_dtype,
                                        "stage_combine_rows_term", [&] {
          axpy_into<acc_t, scalar_t>(acc, terms[j].const_data_ptr<scalar_t>() + start, c[j + 1],
                                     len);
        });
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(),
                                      "stage_combine_rows_out", [&] {
        store_from<acc_t, scalar_t>(out.mutable_data_ptr<scalar_t>() + start, acc, len);
      });
      start += len;
    }
  });
}

at::Tensor stage_combine_rows_cpu(const at::Tensor& base, at::TensorList terms,
                                  const at::Tensor& coeffs,
                                  std::optional<at::ScalarType> out_dtype) {
  check_stage_combine_rows_inputs(base, terms, coeffs, out_dtype);
  TORCH_CHECK(base.device().is_cpu(), "stage_combine_rows (CPU kernel): base must be on the CPU");
  const at::ScalarType dtype = out_dtype.value_or(base.scalar_type());
  const at::Tensor base_c = base.contiguous();
  std::vector<at::Tensor> terms_c;
  terms_c.reserve(terms.size());
  for (const auto& t : terms) terms_c.push_back(t.contiguous());
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(dtype));
  if (base.numel() == 0) return out;
  if (accumulate_in_double(base, terms, dtype) || coeffs.scalar_type() == at::kDouble) {
    const at::Tensor c = coeffs.to(at::kDouble).contiguous();
    combine_rows<double>(base_c, terms_c, c.const_data_ptr<double>(), c.size(0), out);
  } else {
    const at::Tensor c = coeffs.contiguous();
    combine_rows<float>(base_c, terms_c, c.const_data_ptr<float>(), c.size(0), out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(prg_fast, CPU, m) {
  m.impl("stage_combine", &stage_combine_cpu);
  m.impl("stage_combine_rows", &stage_combine_rows_cpu);
}

}  // namespace prg_fast
