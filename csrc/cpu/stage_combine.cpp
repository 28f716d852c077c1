// CPU kernels for prg_fast::stage_combine(_into, _rows): one pass over memory, parallel over
// elements, with the inner loops compiled for AVX-512 / AVX2 / baseline and picked at run time (target_clones), so a
// wheel built anywhere uses the vector units of the machine it runs on.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#include <unistd.h>
#define PRG_FAST_STREAMING_STORES 1
#endif

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

// acc = c * src + acc: the base added last, after the terms' sum (the product rounded first, as
// fused_range's alpha * base + acc)
template <typename acc_t, typename src_t>
PRG_FAST_VECTOR_CLONES void add_scaled(acc_t* __restrict acc, const src_t* __restrict src,
                                       acc_t c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] = c * static_cast<acc_t>(src[i]) + acc[i];
}

template <typename acc_t, typename dst_t>
PRG_FAST_VECTOR_CLONES void store_from(dst_t* __restrict dst, const acc_t* __restrict acc,
                                       int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<dst_t>(acc[i]);
}

// The common dtype mixes -- float32 accumulation with a float32 base and float32 / bfloat16 /
// float16 terms and output (every stage of a float32 or reduced-precision network), and all
// float64 -- get one fused loop per number of terms: each element is read once from every input,
// summed in a register and written once, so the loop moves exactly the bytes of its operands.
// `ivdep`: out may be base or a term itself (an in-place update; element i is read before it is
// written), which is no loop-carried dependence. Four vectors per iteration: with one, a state
// that sits in L2 (2^16 floats, 2 terms) ran at 60% of copy_'s bandwidth, with four at ~90%.
template <int N, typename acc_t, typename base_t, typename term_t, typename out_t>
PRG_FAST_VECTOR_CLONES void fused_range(const base_t* base, const term_t* const* terms,
                                        const acc_t* coeffs, acc_t alpha, out_t* out,
                                        int64_t n) {
  const term_t* t[N > 0 ? N : 1];
  acc_t c[N > 0 ? N : 1];
  for (int j = 0; j < N; ++j) {
    t[j] = terms[j];
    c[j] = coeffs[j];
  }
#pragma GCC ivdep
#pragma GCC unroll 4
  for (int64_t i = 0; i < n; ++i) {
    // the terms summed first and the base added last: the increment h sum_j a_j k_j rounds at its
    // own scale, not at the state's once per term (torchdiffeq's y0 + sum(k * (b dt)) does the same)
    if constexpr (N == 0) {
      out[i] = static_cast<out_t>(alpha * static_cast<acc_t>(base[i]));
    } else {
      acc_t acc = c[0] * static_cast<acc_t>(t[0][i]);
#pragma GCC unroll 8
      for (int j = 1; j < N; ++j) acc += c[j] * static_cast<acc_t>(t[j][i]);
      out[i] = static_cast<out_t>(alpha * static_cast<acc_t>(base[i]) + acc);
    }
  }
}

#ifdef PRG_FAST_STREAMING_STORES
// A call whose operands together exceed the last-level cache writes its float32 output with
// non-temporal (streaming) stores: the output would not stay in cache for its reader anyway, and
// a normal store first reads every line it writes (read-for-ownership), one more stream than the
// k + 2 the sum needs (k = 2 terms at 2^24 floats: 1.39x -> ~1.7x the torch.add chain on an EPYC).
// PRG_FAST_CPU_STREAMING_BYTES replaces the cache size (read once; tests set 0: always stream).
int64_t last_level_cache_bytes() {
  // The instance of the last-level cache that CPU 0 sits in (sysfs), which is what one core's
  // data competes for; sysconf's figure can be the whole package's (256 MiB on a 32 MiB-per-CCX EPYC).
  int64_t bytes = 0;
  int top = 0;
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size");
    int level = 0;
    std::string size;
    if (!(level_file >> level) || !(size_file >> size) || level <= top) continue;
    const int64_t unit = size.back() == 'K' ? 1024 : size.back() == 'M' ? (1 << 20) : 1;
    top = level;
    bytes = std::atoll(size.c_str()) * unit;
  }
  if (bytes > 0) return bytes;
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  return std::min<int64_t>(l3 > 0 ? l3 : (32 << 20), 32 << 20);
}

int64_t streaming_threshold_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("PRG_FAST_CPU_STREAMING_BYTES");
    if (env != nullptr && *env != '\0') return static_cast<int64_t>(std::atoll(env));
    return last_level_cache_bytes();
  }();
  return bytes;
}

bool can_stream() {
  static const bool avx = __builtin_cpu_supports("avx");
  return avx;
}

// fused_range for float32 throughout, with the same arithmetic (a multiply and an add per term,
// in order, the base last) and 32-byte streaming stores; the unaligned head and the tail are written plainly.
template <int N>
__attribute__((target("avx"))) void fused_range_streaming(const float* base, const float* const* terms,
                                                          const float* coeffs, float alpha, float* out,
                                                          int64_t n) {
  const float* t[N > 0 ? N : 1];
  float c[N > 0 ? N : 1];
  __m256 cv[N > 0 ? N : 1];
  for (int j = 0; j < N; ++j) {
    t[j] = terms[j];
    c[j] = coeffs[j];
    cv[j] = _mm256_set1_ps(c[j]);
  }
  auto one = [&](int64_t i) {
    const float scaled = alpha * base[i];
    if (N == 0) {
      out[i] = scaled;
      return;
    }
    float acc = c[0] * t[0][i];
    for (int j = 1; j < N; ++j) acc += c[j] * t[j][i];
    out[i] = scaled + acc;
  };
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<std::uintptr_t>(out + i) & 31) != 0; ++i) one(i);
  const __m256 a = _mm256_set1_ps(alpha);
  for (; i + 8 <= n; i += 8) {
    __m256 acc = _mm256_mul_ps(a, _mm256_loadu_ps(base + i));
    if (N > 0) {
      __m256 sum = _mm256_mul_ps(cv[0], _mm256_loadu_ps(t[0] + i));
      for (int j = 1; j < N; ++j) sum = _mm256_add_ps(sum, _mm256_mul_ps(cv[j], _mm256_loadu_ps(t[j] + i)));
      acc = _mm256_add_ps(acc, sum);
    }
    _mm256_stream_ps(out + i, acc);
  }
  for (; i < n; ++i) one(i);
  _mm_sfence();  // the streamed lines are visible before the op returns
}
#endif

// Pointers and coefficients of one call, converted once (not per chunk).
template <typename acc_t>
struct Operands {
  const void* base;
  const void* terms[kMaxTerms];
  acc_t coeffs[kMaxTerms];
  acc_t alpha;
  int n_terms;
  void* out;
};

template <typename acc_t, typename base_t, typename term_t, typename out_t>
void run_fused(const Operands<acc_t>& p, int64_t n) {
  using range_fn = void (*)(const base_t*, const term_t* const*, const acc_t*, acc_t, out_t*,
                            int64_t);
  static constexpr range_fn kByTerms[kMaxTerms + 1] = {
      fused_range<0, acc_t, base_t, term_t, out_t>, fused_range<1, acc_t, base_t, term_t, out_t>,
      fused_range<2, acc_t, base_t, term_t, out_t>, fused_range<3, acc_t, base_t, term_t, out_t>,
      fused_range<4, acc_t, base_t, term_t, out_t>, fused_range<5, acc_t, base_t, term_t, out_t>,
      fused_range<6, acc_t, base_t, term_t, out_t>, fused_range<7, acc_t, base_t, term_t, out_t>,
      fused_range<8, acc_t, base_t, term_t, out_t>};
  range_fn fn = kByTerms[p.n_terms];
#ifdef PRG_FAST_STREAMING_STORES
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<base_t, float> && std::is_same_v<term_t, float> &&
                std::is_same_v<out_t, float>) {
    static constexpr range_fn kStreaming[kMaxTerms + 1] = {
        fused_range_streaming<0>, fused_range_streaming<1>, fused_range_streaming<2>,
        fused_range_streaming<3>, fused_range_streaming<4>, fused_range_streaming<5>,
        fused_range_streaming<6>, fused_range_streaming<7>, fused_range_streaming<8>};
    const int64_t bytes = n * static_cast<int64_t>(sizeof(float)) * (p.n_terms + 2);
    if (bytes > streaming_threshold_bytes() && can_stream()) fn = kStreaming[p.n_terms];
  }
#endif
  const auto* base = static_cast<const base_t*>(p.base);
  auto* out = static_cast<out_t*>(p.out);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    const term_t* terms[kMaxTerms];
    for (int j = 0; j < p.n_terms; ++j) terms[j] = static_cast<const term_t*>(p.terms[j]) + begin;
    fn(base + begin, terms, p.coeffs, p.alpha, out + begin, end - begin);
  });
}

// Every other mix (rare: float64 with a lower precision, a reduced-precision base): a chunk of
// the sum kept in an L1-sized accumulator, one input at a time; still one pass over memory.
template <typename acc_t>
void run_chunked(const Operands<acc_t>& p, at::ScalarType base_dtype, at::ScalarType term_dtype,
                 at::ScalarType out_dtype, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    acc_t acc[kChunk];
    for (int64_t start = begin; start < end; start += kChunk) {
      const int64_t len = std::min(kChunk, end - start);
      // the terms first, the base last (as fused_range)
      for (int j = 0; j < p.n_terms; ++j) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, term_dtype, "stage_combine_term", [&] {
          const auto* term = static_cast<const scalar_t*>(p.terms[j]) + start;
          if (j == 0) {
            scale_into<acc_t, scalar_t>(acc, term, p.coeffs[j], len);
          } else {
            axpy_into<acc_t, scalar_t>(acc, term, p.coeffs[j], len);
          }
        });
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base_dtype, "stage_combine_base", [&] {
        const auto* base = static_cast<const scalar_t*>(p.base) + start;
        if (p.n_terms == 0) {
          scale_into<acc_t, scalar_t>(acc, base, p.alpha, len);
        } else {
          add_scaled<acc_t, scalar_t>(acc, base, p.alpha, len);
        }
      });
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "stage_combine_out", [&] {
        store_from<acc_t, scalar_t>(static_cast<scalar_t*>(p.out) + start, acc, len);
      });
    }
  });
}

template <typename acc_t>
Operands<acc_t> operands(const at::Tensor& base, const std::vector<at::Tensor>& terms,
                         at::ArrayRef<double> coeffs, double alpha, at::Tensor& out) {
  Operands<acc_t> p{};
  p.base = base.const_data_ptr();
  p.alpha = static_cast<acc_t>(alpha);
  p.n_terms = static_cast<int>(terms.size());
  for (size_t j = 0; j < terms.size(); ++j) {
    p.terms[j] = terms[j].const_data_ptr();
    p.coeffs[j] = static_cast<acc_t>(coeffs[j]);
  }
  p.out = out.mutable_data_ptr();
  return p;
}

bool is_reduced_or_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// out = alpha * base + sum_j coeffs[j] * terms[j] into `out` (dense; checked by the callers).
void combine_into(const at::Tensor& base_in, at::TensorList terms_in, at::ArrayRef<double> coeffs,
                  double alpha, at::Tensor& out) {
  const int64_t n = base_in.numel();
  if (n == 0) return;
  // Non-contiguous inputs are accepted; the kernel reads dense copies of them.
  const at::Tensor base = base_in.contiguous();
  std::vector<at::Tensor> terms;
  terms.reserve(terms_in.size());
  for (const auto& t : terms_in) terms.push_back(t.contiguous());
  const at::ScalarType base_dtype = base.scalar_type();
  const at::ScalarType term_dtype = terms.empty() ? base_dtype : terms[0].scalar_type();
  const at::ScalarType out_dtype = out.scalar_type();
  if (accumulate_in_double(base, terms_in, out_dtype)) {
    const Operands<double> p = operands<double>(base, terms, coeffs, alpha, out);
    if (base_dtype == at::kDouble && term_dtype == at::kDouble && out_dtype == at::kDouble) {
      run_fused<double, double, double, double>(p, n);
    } else {
      run_chunked<double>(p, base_dtype, term_dtype, out_dtype, n);
    }
    return;
  }
  const Operands<float> p = operands<float>(base, terms, coeffs, alpha, out);
  if (base_dtype != at::kFloat || !is_reduced_or_float(term_dtype)) {
    run_chunked<float>(p, base_dtype, term_dtype, out_dtype, n);
    return;
  }
  with_reduced_type(term_dtype, [&](auto term_tag) {
    with_reduced_type(out_dtype, [&](auto out_tag) {
      run_fused<float, float, decltype(term_tag), decltype(out_tag)>(p, n);
    });
  });
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
      for (size_t j = 0; j < terms.size(); ++j) {  // the terms first, the base last (as fused_range)
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, term_dtype,
                                        "stage_combine_rows_term", [&] {
          const scalar_t* term = terms[j].const_data_ptr<scalar_t>() + start;
          if (j == 0) {
            scale_into<acc_t, scalar_t>(acc, term, c[1], len);
          } else {
            axpy_into<acc_t, scalar_t>(acc, term, c[j + 1], len);
          }
        });
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(),
                                      "stage_combine_rows_base", [&] {
        const scalar_t* b = base.const_data_ptr<scalar_t>() + start;
        if (terms.empty()) {
          scale_into<acc_t, scalar_t>(acc, b, c[0], len);
        } else {
          add_scaled<acc_t, scalar_t>(acc, b, c[0], len);
        }
      });
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
  m.impl("stage_combine", &stage_combine_on<combine_into, c10::DeviceType::CPU>);
  m.impl("stage_combine_into", &stage_combine_into_on<combine_into, c10::DeviceType::CPU>);
  m.impl("stage_combine_rows", &stage_combine_rows_cpu);
}

}  // namespace prg_fast
