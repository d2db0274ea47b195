// nanoseek::packed_linear in C++: y = x @ w.T on a weight packed ahead of time (kind 0: MKL sgemm pack,
// kind 1: oneDNN-blocked, bf16 or fp32, kind 2: fp32 in 16-column panels, our own AVX2 kernel for a few
// rows), and nanoseek::grouped_linear, the panel kernel over a MoE layer's routed experts. Stateless:
// the runner owns the packs and passes them in. Registered for the CPU and MkldnnCPU keys (the packs are
// mkldnn-layout tensors), so a compiled decode step's C++ wrapper calls the kernel without a round trip
// into Python (~5 us per call, ~20 calls a step).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define NANOSEEK_PANEL 1
#endif

namespace {

#ifdef NANOSEEK_PANEL
// The panel kernel. A decode step multiplies 1-8 rows by each weight; MKL's sgemm packs the weight on every
// call at 2-4 rows and runs 2-3x slower there than at 1 (AVX2 EPYC). Here the weight is packed once
// (gemm.py `pack`) as (ceil(N / 16), K, 16): column panel p holds w[16p : 16p + 16, :].T, so a tile walks
// its panel's memory in order. A tile keeps MR rows x 16 P columns of y in 8 ymm accumulators (enough
// independent FMA chains for two FMA units of latency 4) and per k loads 2 P weight vectors and
// broadcasts MR inputs: each weight element is read once per 4 rows.
constexpr int64_t NB = 16;

template <int MR, int P>
__attribute__((target("avx2,fma"))) inline void tile(const float* x, int64_t K, const float* panel, float* out) {
  __m256 acc[MR][2 * P];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 2 * P; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 wv[2 * P];
    for (int p = 0; p < P; ++p) {
      wv[2 * p] = _mm256_loadu_ps(panel + p * K * NB + k * NB);
      wv[2 * p + 1] = _mm256_loadu_ps(panel + p * K * NB + k * NB + 8);
    }
    for (int m = 0; m < MR; ++m) {
      __m256 v = _mm256_broadcast_ss(x + m * K + k);
      for (int j = 0; j < 2 * P; ++j) acc[m][j] = _mm256_fmadd_ps(v, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 2 * P; ++j) _mm256_storeu_ps(out + m * NB * P + 8 * j, acc[m][j]);
}

__attribute__((target("avx2,fma"))) inline void store8(float* out, __m256 a, __m256 b, __m256 c, __m256 d, __m256 e,
                                                     __m256 f, __m256 g, __m256 h) {
  _mm256_storeu_ps(out, a);
  _mm256_storeu_ps(out + 8, b);
  _mm256_storeu_ps(out + 16, c);
  _mm256_storeu_ps(out + 24, d);
  _mm256_storeu_ps(out + 32, e);
  _mm256_storeu_ps(out + 40, f);
  _mm256_storeu_ps(out + 48, g);
  _mm256_storeu_ps(out + 56, h);
}

// The two 8-accumulator tiles by hand, results stored one by one: GCC kept their arrays (and an array of results)
// on the stack, a store per FMA, measured 2-3x slower
template <>
__attribute__((target("avx2,fma"))) inline void tile<4, 1>(const float* x, int64_t K, const float* panel, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
  const float *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K;
  for (int64_t k = 0; k < K; ++k) {
    __m256 w0 = _mm256_loadu_ps(panel + k * NB), w1 = _mm256_loadu_ps(panel + k * NB + 8);
    __m256 v = _mm256_broadcast_ss(x0 + k);
    a0 = _mm256_fmadd_ps(v, w0, a0);
    a1 = _mm256_fmadd_ps(v, w1, a1);
    v = _mm256_broadcast_ss(x1 + k);
    b0 = _mm256_fmadd_ps(v, w0, b0);
    b1 = _mm256_fmadd_ps(v, w1, b1);
    v = _mm256_broadcast_ss(x2 + k);
    c0 = _mm256_fmadd_ps(v, w0, c0);
    c1 = _mm256_fmadd_ps(v, w1, c1);
    v = _mm256_broadcast_ss(x3 + k);
    d0 = _mm256_fmadd_ps(v, w0, d0);
    d1 = _mm256_fmadd_ps(v, w1, d1);
  }
  store8(out, a0, a1, b0, b1, c0, c1, d0, d1);
}

template <>
__attribute__((target("avx2,fma"))) inline void tile<1, 4>(const float* x, int64_t K, const float* panel, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  const float *p0 = panel, *p1 = panel + K * NB, *p2 = panel + 2 * K * NB, *p3 = panel + 3 * K * NB;
  for (int64_t k = 0; k < K; ++k) {
    __m256 v = _mm256_broadcast_ss(x + k);
    int64_t o = k * NB;
    a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p0 + o), a0);
    a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p0 + o + 8), a1);
    a2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p1 + o), a2);
    a3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p1 + o + 8), a3);
    a4 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p2 + o), a4);
    a5 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p2 + o + 8), a5);
    a6 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p3 + o), a6);
    a7 = _mm256_fmadd_ps(v, _mm256_loadu_ps(p3 + o + 8), a7);
  }
  store8(out, a0, a1, a2, a3, a4, a5, a6, a7);
}

// rows m0.. (MR of them) x panels [p, p + P) of y; the last panel may hold fewer than 16 real columns
template <int MR, int P>
void panel_tile(const float* x, int64_t K, const float* pack, int64_t N, float* y, int64_t p) {
  float buf[MR * NB * P];
  tile<MR, P>(x, K, pack + p * K * NB, buf);
  int64_t c0 = p * NB, cols = std::min<int64_t>(NB * P, N - c0);
  for (int m = 0; m < MR; ++m) std::memcpy(y + m * N + c0, buf + m * NB * P, cols * sizeof(float));
}

// rows x panels [p, ...) with the widest tile that fits before `end`: 4 panels for 1 row, 2 for 2, else 1
// (8 accumulators or fewer); returns the panels done
template <int MR>
int64_t panel_rows(const float* x, int64_t K, const float* pack, int64_t N, float* y, int64_t p, int64_t end) {
  constexpr int P = MR == 1 ? 4 : MR == 2 ? 2 : 1;
  if (P > 1 && p + P <= end) {
    panel_tile<MR, P>(x, K, pack, N, y, p);
    return P;
  }
  panel_tile<MR, 1>(x, K, pack, N, y, p);
  return 1;
}

// all M rows of x from panel p on (panels before `end`): M <= 4 is one row chunk, free to take several
// panels at once; more rows go in chunks of 4 (and a rest) that walk one panel together while it is in
// cache. Returns the panels done.
int64_t rows_at_panel(const float* x, int64_t M, int64_t K, const float* pack, int64_t N, float* y, int64_t p,
                      int64_t end) {
  int64_t step = 1;
  if (M > 4) end = p + 1;
  for (int64_t m = 0; m < M; m += 4) {
    const float* xm = x + m * K;
    float* ym = y + m * N;
    switch (std::min<int64_t>(4, M - m)) {
      case 4: step = panel_rows<4>(xm, K, pack, N, ym, p, end); break;
      case 3: step = panel_rows<3>(xm, K, pack, N, ym, p, end); break;
      case 2: step = panel_rows<2>(xm, K, pack, N, ym, p, end); break;
      default: step = panel_rows<1>(xm, K, pack, N, ym, p, end);
    }
  }
  return step;
}

at::Tensor panel_linear(const at::Tensor& x2, const at::Tensor& pack, int64_t N) {
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
              "nanoseek panel kernel: this CPU has no AVX2/FMA");
  TORCH_CHECK(x2.scalar_type() == at::kFloat && pack.scalar_type() == at::kFloat && pack.is_contiguous() &&
                  pack.size(1) == x2.size(1) && pack.size(2) == NB && pack.size(0) == (N + NB - 1) / NB,
              "nanoseek panel kernel: fp32 x (M, K) and a (ceil(N/16), K, 16) pack");
  int64_t M = x2.size(0), K = x2.size(1), panels = pack.size(0);
  auto y = at::empty({M, N}, x2.options());
  const float* xp = x2.data_ptr<float>();
  const float* wp = pack.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // a thread takes >= 64 KB of weight: below that the second thread costs more than it brings
  int64_t grain = std::max<int64_t>(4, 16384 / (NB * std::max<int64_t>(K, 1)));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1;) p += rows_at_panel(xp, M, K, wp, N, yp, p, p1);
  });
  return y;
}

// The routed experts of a MoE layer as one call: x holds the (token, expert) pairs' rows sorted by
// expert, offsets (E + 1) the cumulative row counts, packs (E, panels, K, 16) each expert's weight in
// panels. Row r of y = x[r] @ w_e.T for its expert e: only the routed rows are computed, each expert's
// weight is read once, and every shape is fixed by the step (E, the pair count), so a compiled step
// needs no capacity. Work items are (expert, 4 panels): the same tiles as panel_linear per expert.
at::Tensor grouped_panel_linear(const at::Tensor& x, const at::Tensor& packs, const at::Tensor& offsets,
                                int64_t N) {
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
              "nanoseek panel kernel: this CPU has no AVX2/FMA");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && packs.scalar_type() == at::kFloat &&
                  packs.is_contiguous() && packs.dim() == 4 && packs.size(2) == x.size(1) && packs.size(3) == NB &&
                  packs.size(1) == (N + NB - 1) / NB && offsets.numel() == packs.size(0) + 1,
              "nanoseek grouped panel kernel: fp32 x (P, K), packs (E, ceil(N/16), K, 16), offsets (E + 1)");
  auto x2 = x.contiguous();
  auto off = offsets.to(at::kLong).contiguous();
  int64_t E = packs.size(0), panels = packs.size(1), K = x2.size(1), groups = (panels + 3) / 4;
  auto y = at::empty({x2.size(0), N}, x2.options());
  const float* xp = x2.data_ptr<float>();
  const float* wp = packs.data_ptr<float>();
  const int64_t* op = off.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  TORCH_CHECK(op[0] == 0 && op[E] == x2.size(0), "nanoseek grouped panel kernel: offsets must run from 0 to P");
  at::parallel_for(0, E * groups, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      int64_t e = i / groups, p1 = std::min(panels, (i % groups) * 4 + 4), r0 = op[e], M = op[e + 1] - r0;
      const float* pack = wp + e * panels * K * NB;
      for (int64_t p = (i % groups) * 4; p < p1 && M > 0;)
        p += rows_at_panel(xp + r0 * K, M, K, pack, N, yp + r0 * N, p, p1);
    }
  });
  return y;
}
#endif

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w, int64_t kind) {
  static auto mkl = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("mkl::_mkl_linear", "")
                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const std::optional<at::Tensor>&, int64_t)>();
  static auto onednn = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                             c10::string_view, c10::List<std::optional<at::Scalar>>,
                                             std::optional<c10::string_view>)>();
  auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
  at::Tensor y;
  if (kind == 2) {
#ifdef NANOSEEK_PANEL
    y = panel_linear(x2, packed, w.size(0));
#else
    TORCH_CHECK(false, "nanoseek panel kernel: x86-64 only");
#endif
  } else {
    y = kind == 0 ? mkl.call(x2, packed, w, std::nullopt, x2.size(0))
                  : onednn.call(x2, packed, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), "");
  }
  auto sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  return y.view(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
  m.impl("packed_linear", packed_linear);
#ifdef NANOSEEK_PANEL
  m.impl("grouped_linear", grouped_panel_linear);
#endif
}
TORCH_LIBRARY_IMPL(nanoseek, MkldnnCPU, m) { m.impl("packed_linear", packed_linear); }
