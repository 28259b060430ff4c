// Fused routing on CPU: the softmax top-k router, the sort of its token-expert pairs, and the
// values of the balancing losses.
//
//     logits = x W^T,  p = softmax(logits),  ids = top-k(p + bias),  g = p[ids] (/ sum p[ids])
//
// Why: at the workbench's small sizes (2,048 tokens, 8 experts) each of the dozen ATen ops of
// the readable router (workbench/moe/routers.py) and of their backward costs more in dispatch
// and thread start-up than in arithmetic, and BLAS is slow on the gate's (T, D) x (D, 8) shape.
// Here all of it is one pass over the tokens each way, the tokens cut into one equal range per
// intra-op thread. workbench/kernels/cpu/build.py builds this file with swiglu_experts_cpu.cpp;
// the tests check both against the readable reference.

#include <ATen/ATen.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "vec_math.h"

using at::Tensor;

namespace {

using workbench_simd::has_avx2;
#ifdef WORKBENCH_X86_SIMD
using workbench_simd::exp8;
#endif

// Added to the sum of the selected probabilities before renormalising (workbench/moe/routers.py: GATE_SUM_FLOOR).
constexpr float kGateSumFloor = 1e-20f;

// Runs fn(begin, end, part) on `parts` equal token ranges, one per intra-op thread.
template <class Fn>
void for_each_part(int64_t num_tokens, int64_t parts, const Fn& fn) {
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) fn(num_tokens * p / parts, num_tokens * (p + 1) / parts, p);
  });
}

int64_t num_parts(int64_t num_tokens) {
  // below ~256 tokens a part costs more to start than it saves
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_tokens / 256));
}

void check_float_matrix(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.is_contiguous(),
              "fused routing: ", name, " must be a contiguous 2-d float32 CPU tensor");
}

// The gate's two products, token by token. At E = 8 rows BLAS handles (T, D) x (D, E) poorly
// (a few GFLOP/s); these loops keep a token's row in cache and vectorise over D. They are
// compiled twice, for AVX2 + FMA and for the baseline, and the first is used where the CPU has it.

// logits[t, e] = <x[t], w[e]> for t in [begin, end). Four experts at a time: four independent
// sums keep the vector adds from waiting on each other.
__attribute__((always_inline)) inline void gate_logits_impl(const float* x, const float* w, int64_t begin, int64_t end,
                                                            int64_t D, int64_t E, float* logits) {
  for (int64_t t = begin; t < end; ++t) {
    const float* xt = x + t * D;
    float* l = logits + t * E;
    int64_t e = 0;
    for (; e + 4 <= E; e += 4) {
      const float *w0 = w + e * D, *w1 = w0 + D, *w2 = w1 + D, *w3 = w2 + D;
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t d = 0; d < D; ++d) s0 += xt[d] * w0[d], s1 += xt[d] * w1[d], s2 += xt[d] * w2[d], s3 += xt[d] * w3[d];
      l[e] = s0, l[e + 1] = s1, l[e + 2] = s2, l[e + 3] = s3;
    }
    for (; e < E; ++e) {
      const float* we = w + e * D;
      float s0 = 0.0f;
#pragma omp simd reduction(+ : s0)
      for (int64_t d = 0; d < D; ++d) s0 += xt[d] * we[d];
      l[e] = s0;
    }
  }
}

// grad_x[t] = sum_e dl[t, e] w[e] for t in [begin, end), and grad_w[e] += sum_t dl[t, e] x[t].
__attribute__((always_inline)) inline void gate_backward_impl(const float* dl, const float* x, const float* w,
                                                              int64_t begin, int64_t end, int64_t D, int64_t E,
                                                              float* grad_x, float* grad_w) {
  for (int64_t t = begin; t < end; ++t) {
    const float *xt = x + t * D, *dlt = dl + t * E;
    float* gx = grad_x + t * D;
    std::fill(gx, gx + D, 0.0f);
    for (int64_t e = 0; e < E; ++e) {
      const float de = dlt[e];
      const float* we = w + e * D;
      float* gw = grad_w + e * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) gx[d] += de * we[d], gw[d] += de * xt[d];
    }
  }
}

#ifdef WORKBENCH_X86_SIMD
__attribute__((target("avx2,fma"))) void gate_logits_avx2(const float* x, const float* w, int64_t begin, int64_t end,
                                                          int64_t D, int64_t E, float* logits) {
  gate_logits_impl(x, w, begin, end, D, E, logits);
}
__attribute__((target("avx2,fma"))) void gate_backward_avx2(const float* dl, const float* x, const float* w,
                                                            int64_t begin, int64_t end, int64_t D, int64_t E,
                                                            float* grad_x, float* grad_w) {
  gate_backward_impl(dl, x, w, begin, end, D, E, grad_x, grad_w);
}
// Lane i of the result is the sum of the 8 lanes of v[i].
__attribute__((target("avx2,fma"))) inline __m256 transpose_sum8(const __m256* v) {
  const __m256 sums0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 sums4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // each 128-bit half now holds 4 partial sums (low half: lanes 0-3 of v[i], high half: lanes 4-7)
  return _mm256_add_ps(_mm256_permute2f128_ps(sums0123, sums4567, 0x20),
                       _mm256_permute2f128_ps(sums0123, sums4567, 0x31));
}

// The two products of the gate for E and D multiples of 8, eight experts at a time: a token's
// row is read once per eight experts, and the eight dot products are summed across lanes together.
__attribute__((target("avx2,fma"))) void gate_logits_by8(const float* x, const float* w, int64_t begin, int64_t end,
                                                        int64_t D, int64_t E, float* logits) {
  for (int64_t t = begin; t < end; ++t) {
    const float* xt = x + t * D;
    for (int64_t e0 = 0; e0 < E; e0 += 8) {
      const float* w0 = w + e0 * D;
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 xv = _mm256_loadu_ps(xt + d);
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w0 + j * D + d), acc[j]);
      }
      _mm256_storeu_ps(logits + t * E + e0, transpose_sum8(acc));
    }
  }
}

// grad_x[t] = sum_e dl[t, e] w[e] with a token's eight gradients held in registers, and
// grad_w[e] += sum_t dl[t, e] x[t] four tokens per pass over grad_w (in token order, as the
// generic loop sums).
__attribute__((target("avx2,fma"))) void gate_backward_by8(const float* dl, const float* x, const float* w,
                                                          int64_t begin, int64_t end, int64_t D, int64_t E,
                                                          float* grad_x, float* grad_w) {
  for (int64_t t = begin; t < end; ++t) {
    float* gx = grad_x + t * D;
    for (int64_t e0 = 0; e0 < E; e0 += 8) {
      __m256 de[8];
      for (int j = 0; j < 8; ++j) de[j] = _mm256_set1_ps(dl[t * E + e0 + j]);
      for (int64_t d = 0; d < D; d += 8) {
        __m256 acc = e0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(gx + d);
        for (int j = 0; j < 8; ++j) acc = _mm256_fmadd_ps(de[j], _mm256_loadu_ps(w + (e0 + j) * D + d), acc);
        _mm256_storeu_ps(gx + d, acc);
      }
    }
  }
  int64_t t = begin;
  for (; t + 4 <= end; t += 4) {
    const float* xt = x + t * D;
    for (int64_t e = 0; e < E; ++e) {
      const __m256 d0 = _mm256_set1_ps(dl[t * E + e]), d1 = _mm256_set1_ps(dl[(t + 1) * E + e]);
      const __m256 d2 = _mm256_set1_ps(dl[(t + 2) * E + e]), d3 = _mm256_set1_ps(dl[(t + 3) * E + e]);
      float* gw = grad_w + e * D;
      for (int64_t d = 0; d < D; d += 8) {
        __m256 acc = _mm256_fmadd_ps(d0, _mm256_loadu_ps(xt + d), _mm256_loadu_ps(gw + d));
        acc = _mm256_fmadd_ps(d1, _mm256_loadu_ps(xt + D + d), acc);
        acc = _mm256_fmadd_ps(d2, _mm256_loadu_ps(xt + 2 * D + d), acc);
        acc = _mm256_fmadd_ps(d3, _mm256_loadu_ps(xt + 3 * D + d), acc);
        _mm256_storeu_ps(gw + d, acc);
      }
    }
  }
  for (; t < end; ++t) {
    for (int64_t e = 0; e < E; ++e) {
      const __m256 de = _mm256_set1_ps(dl[t * E + e]);
      float* gw = grad_w + e * D;
      for (int64_t d = 0; d < D; d += 8) {
        _mm256_storeu_ps(gw + d, _mm256_fmadd_ps(de, _mm256_loadu_ps(x + t * D + d), _mm256_loadu_ps(gw + d)));
      }
    }
  }
}

__attribute__((target("avx2,fma"))) inline float horizontal_max(__m256 v) {
  v = _mm256_max_ps(v, _mm256_permute2f128_ps(v, v, 1));
  v = _mm256_max_ps(v, _mm256_shuffle_ps(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm256_cvtss_f32(_mm256_max_ps(v, _mm256_shuffle_ps(v, v, _MM_SHUFFLE(2, 3, 0, 1))));
}

__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 v) {
  v = _mm256_add_ps(v, _mm256_permute2f128_ps(v, v, 1));
  v = _mm256_add_ps(v, _mm256_shuffle_ps(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm256_cvtss_f32(_mm256_add_ps(v, _mm256_shuffle_ps(v, v, _MM_SHUFFLE(2, 3, 0, 1))));
}

// p = softmax(l) over one token's E logits, E a multiple of 8; returns (max l, sum e^(l - max)).
__attribute__((target("avx2,fma"))) std::pair<float, float> softmax_row_avx2(const float* l, float* p, int64_t E) {
  __m256 m = _mm256_loadu_ps(l);
  for (int64_t e = 8; e < E; e += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(l + e));
  const float max = horizontal_max(m);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t e = 0; e < E; e += 8) {
    const __m256 ex = exp8(_mm256_sub_ps(_mm256_loadu_ps(l + e), _mm256_set1_ps(max)));
    _mm256_storeu_ps(p + e, ex);
    sum = _mm256_add_ps(sum, ex);
  }
  const float total = horizontal_sum(sum);
  const __m256 inv = _mm256_set1_ps(1.0f / total);
  for (int64_t e = 0; e < E; e += 8) _mm256_storeu_ps(p + e, _mm256_mul_ps(_mm256_loadu_ps(p + e), inv));
  return {max, total};
}
#endif

// p = softmax(l) over one token's E logits; returns (max l, sum e^(l - max)) for a logsumexp.
// The vector path takes E a multiple of 8 (8, 16, 64 experts ...).
std::pair<float, float> softmax_row(const float* l, float* p, int64_t E) {
#ifdef WORKBENCH_X86_SIMD
  if (E % 8 == 0 && has_avx2()) return softmax_row_avx2(l, p, E);
#endif
  const float m = *std::max_element(l, l + E);
  float sum = 0.0f;
  for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e] - m));
  const float inv = 1.0f / sum;
  for (int64_t e = 0; e < E; ++e) p[e] *= inv;
  return {m, sum};
}

void gate_logits(const float* x, const float* w, int64_t begin, int64_t end, int64_t D, int64_t E, float* logits) {
#ifdef WORKBENCH_X86_SIMD
  if (has_avx2()) {
    return E % 8 == 0 && D % 8 == 0 ? gate_logits_by8(x, w, begin, end, D, E, logits)
                                    : gate_logits_avx2(x, w, begin, end, D, E, logits);
  }
#endif
  gate_logits_impl(x, w, begin, end, D, E, logits);
}

void gate_backward(const float* dl, const float* x, const float* w, int64_t begin, int64_t end, int64_t D, int64_t E,
                   float* grad_x, float* grad_w) {
#ifdef WORKBENCH_X86_SIMD
  if (has_avx2()) {
    return E % 8 == 0 && D % 8 == 0 ? gate_backward_by8(dl, x, w, begin, end, D, E, grad_x, grad_w)
                                    : gate_backward_avx2(dl, x, w, begin, end, D, E, grad_x, grad_w);
  }
#endif
  gate_backward_impl(dl, x, w, begin, end, D, E, grad_x, grad_w);
}

// Softmax, top-k and gates of tokens [begin, end) from their logits (T, E). The sizes come by
// value: captured by reference they could alias the int64 ids written here, and every loop
// would reload them.
void route_tokens(const float* lp, const float* bp, int64_t begin, int64_t end, int64_t E, int64_t k, bool normalize,
                  float* pp, int64_t* ip, float* gp) {
  std::vector<float> rank(E);
  for (int64_t t = begin; t < end; ++t) {
    float* p = pp + t * E;
    softmax_row(lp + t * E, p, E);
    // top-k by insertion into the K best so far (K is small)
    for (int64_t e = 0; e < E; ++e) rank[e] = bp ? p[e] + bp[e] : p[e];
    int64_t* it = ip + t * k;
    int64_t filled = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (filled == k && !(rank[e] > rank[it[k - 1]])) continue;
      int64_t pos = filled < k ? filled++ : k - 1;
      while (pos > 0 && rank[e] > rank[it[pos - 1]]) it[pos] = it[pos - 1], --pos;
      it[pos] = e;
    }
    float* g = gp + t * k;
    float selected = 0.0f;
    for (int64_t j = 0; j < k; ++j) selected += (g[j] = p[it[j]]);
    if (normalize) {
      const float denom = selected + kGateSumFloor;
      for (int64_t j = 0; j < k; ++j) g[j] /= denom;
    }
  }
}

}  // namespace

// Forward. x (T, D), weight (E, D), bias (E,) or none. Returns (logits (T, E), probs (T, E),
// ids (T, K) int64, gates (T, K)). Selection ranks p + bias (the bias never weights); the K
// ids come in descending order of p + bias, ties to the lower expert. Gates are the selected
// probabilities, renormalised to sum to one when `normalize`.
std::vector<Tensor> softmax_topk_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                         int64_t k, bool normalize) {
  check_float_matrix(x, "x");
  check_float_matrix(weight, "weight");
  const int64_t T = x.size(0), D = x.size(1), E = weight.size(0);
  TORCH_CHECK(weight.size(1) == D, "fused routing: weight must be (E, D) with the D of x");
  TORCH_CHECK(k >= 1 && k <= E, "fused routing: k must be in [1, E]");
  const Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : Tensor();
  TORCH_CHECK(!b.defined() || (b.scalar_type() == at::kFloat && b.numel() == E), "fused routing: bias must be (E,) float32");
  Tensor logits = at::empty({T, E}, x.options()), probs = at::empty({T, E}, x.options());
  Tensor ids = at::empty({T, k}, x.options().dtype(at::kLong)), gates = at::empty({T, k}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>(), *bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float *lp = logits.data_ptr<float>(), *pp = probs.data_ptr<float>(), *gp = gates.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();

  for_each_part(T, num_parts(T), [&](int64_t begin, int64_t end, int64_t) {
    gate_logits(xp, wp, begin, end, D, E, lp);
    route_tokens(lp, bp, begin, end, E, k, normalize, pp, ip, gp);
  });
  return {logits, probs, ids, gates};
}

// Backward of softmax_topk_forward. Any of the three upstream gradients may be absent (no
// gradient reached that output). Returns (grad_x (T, D), grad_weight (E, D)).
std::vector<Tensor> softmax_topk_backward(const std::optional<Tensor>& grad_logits, const std::optional<Tensor>& grad_probs,
                                          const std::optional<Tensor>& grad_gates, const Tensor& x, const Tensor& weight,
                                          const Tensor& probs, const Tensor& ids, const Tensor& gates, bool normalize) {
  check_float_matrix(x, "x");
  check_float_matrix(weight, "weight");
  check_float_matrix(probs, "probs");
  check_float_matrix(gates, "gates");
  const int64_t T = x.size(0), D = x.size(1), E = weight.size(0), K = ids.size(1);
  const auto optional_grad = [](const std::optional<Tensor>& g, const char* name) -> Tensor {
    if (!g.has_value() || !g->defined()) return Tensor();
    Tensor c = g->contiguous();
    check_float_matrix(c, name);
    return c;
  };
  const Tensor g_logits = optional_grad(grad_logits, "grad_logits"), g_probs = optional_grad(grad_probs, "grad_probs");
  const Tensor g_gates = optional_grad(grad_gates, "grad_gates");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.size(0) == T && gates.size(1) == K,
              "fused routing: ids and gates must be (T, K) as the forward returned them");

  Tensor grad_logits_total = at::empty({T, E}, x.options());  // dL/dlogits, every path summed
  const float *pp = probs.data_ptr<float>(), *gp = gates.data_ptr<float>();
  const int64_t* ip = ids.data_ptr<int64_t>();
  const float *glp = g_logits.defined() ? g_logits.data_ptr<float>() : nullptr;
  const float *gpp = g_probs.defined() ? g_probs.data_ptr<float>() : nullptr;
  const float *ggp = g_gates.defined() ? g_gates.data_ptr<float>() : nullptr;
  float* dlp = grad_logits_total.data_ptr<float>();

  const int64_t parts = num_parts(T);
  Tensor grad_x = at::empty({T, D}, x.options());
  Tensor grad_w_parts = at::zeros({parts, E, D}, x.options());  // each part's sum over its tokens
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *gxp = grad_x.data_ptr<float>(), *gwp = grad_w_parts.data_ptr<float>();
  for_each_part(T, parts, [&](int64_t begin, int64_t end, int64_t part) {
    std::vector<float> dp(E);
    for (int64_t t = begin; t < end; ++t) {
      const float* p = pp + t * E;
      // d loss / d p: the probabilities' own gradient plus the gates' (through the renormalisation)
      for (int64_t e = 0; e < E; ++e) dp[e] = gpp ? gpp[t * E + e] : 0.0f;
      if (ggp) {
        const int64_t* it = ip + t * K;
        const float *gg = ggp + t * K, *g = gp + t * K;
        if (normalize) {
          // g_j = p_j / S (S = sum of the selected p + floor): dL/dp_j = (dL/dg_j - sum_i dL/dg_i g_i) / S
          float selected = 0.0f, dot = 0.0f;
          for (int64_t j = 0; j < K; ++j) selected += p[it[j]], dot += gg[j] * g[j];
          const float denom = selected + kGateSumFloor;
          for (int64_t j = 0; j < K; ++j) dp[it[j]] += (gg[j] - dot) / denom;
        } else {
          for (int64_t j = 0; j < K; ++j) dp[it[j]] += gg[j];
        }
      }
      // softmax: dL/dl_e = p_e (dL/dp_e - sum_i p_i dL/dp_i), plus the logits' own gradient
      float dot = 0.0f;
      for (int64_t e = 0; e < E; ++e) dot += p[e] * dp[e];
      float* dl = dlp + t * E;
      for (int64_t e = 0; e < E; ++e) dl[e] = p[e] * (dp[e] - dot) + (glp ? glp[t * E + e] : 0.0f);
    }
    // logits = x W^T: dL/dx = dl W, and this part's share of dL/dW = dl^T x
    gate_backward(dlp, xp, wp, begin, end, D, E, gxp, gwp + part * E * D);
  });
  const Tensor grad_weight = grad_w_parts.sum(0);  // over parts, in a fixed order: deterministic
  return {grad_x, grad_weight};
}

// The token-expert pairs (row-major from ids (T, K)) sorted by expert, stable: a counting sort.
// Returns (sorted_to_pair (N,), pair_to_sorted (N,), tokens_per_expert (E,)), all int64.
std::vector<Tensor> sort_pairs_by_expert(const Tensor& ids, int64_t num_experts) {
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              "fused routing: ids must be a contiguous int64 CPU tensor");
  const int64_t N = ids.numel();
  const int64_t* ip = ids.data_ptr<int64_t>();
  Tensor counts = at::zeros({num_experts}, ids.options());
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(ip[n] >= 0 && ip[n] < num_experts, "fused routing: expert id ", ip[n], " out of range [0, ",
                num_experts, ")");
    ++cp[ip[n]];
  }
  std::vector<int64_t> next(num_experts, 0);  // next free sorted row of each expert
  for (int64_t e = 1; e < num_experts; ++e) next[e] = next[e - 1] + cp[e - 1];
  Tensor sorted_to_pair = at::empty({N}, ids.options()), pair_to_sorted = at::empty({N}, ids.options());
  int64_t *s2p = sorted_to_pair.data_ptr<int64_t>(), *p2s = pair_to_sorted.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t row = next[ip[n]]++;
    s2p[row] = n, p2s[n] = row;
  }
  return {sorted_to_pair, pair_to_sorted, counts};
}


namespace {

void check_ids(const Tensor& ids, const Tensor& scores) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.is_contiguous() && ids.size(0) == scores.size(0),
              "fused routing: ids must be a contiguous (T, K) int64 tensor");
}

// Adds the assignments of tokens [begin, end) to count (E,) and their scores, normalised to sum to
// one per token (balance._as_distribution), to mass (E,): the f and P of the balancing losses.
void add_counts_and_mass(const float* sp, const int64_t* ip, int64_t begin, int64_t end, int64_t E, int64_t K,
                         double* count, double* mass) {
  for (int64_t t = begin; t < end; ++t) {
    const float* s = sp + t * E;
    double sigma = 0.0;
    for (int64_t e = 0; e < E; ++e) sigma += s[e];
    const double inv_sigma = 1.0 / sigma;
    for (int64_t e = 0; e < E; ++e) mass[e] += s[e] * inv_sigma;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = ip[t * K + k];
      TORCH_CHECK(e >= 0 && e < E, "fused routing: expert id ", e, " out of range [0, ", E, ")");
      count[e] += 1.0;
    }
  }
}

}  // namespace

// The values of the three balancing losses of workbench/moe/balance.py for routing without
// padding, in one pass and without a graph: what the layer reports for the losses that carry
// no weight (weighted ones take the autograd path). scores (T, E) as the router gave them (a
// token's scores are normalised to sum to one, as balance._as_distribution does), ids (T, K),
// logits (T, E); the T tokens are num_sequences sequences of equal length. Returns (3,) float32:
//     switch_aux_loss   E * sum_e f_e P_e             over the whole batch
//     sequence_aux_loss mean_b sum_e f_be P_be        f_be = E / (K S) * count_be
//     router_z_loss     mean_t logsumexp(logits_t)^2
// Sums run in double, so the values agree with the fp32 reference to its rounding.
Tensor balance_loss_values(const Tensor& scores, const Tensor& ids, const Tensor& logits, int64_t num_sequences) {
  check_float_matrix(scores, "scores");
  check_float_matrix(logits, "logits");
  check_ids(ids, scores);
  const int64_t T = scores.size(0), E = scores.size(1), K = ids.size(1), B = num_sequences;
  TORCH_CHECK(logits.sizes() == scores.sizes(), "fused routing: logits must be shaped like scores");
  TORCH_CHECK(B >= 1 && T % B == 0, "fused routing: ", T, " tokens are not ", B, " sequences of equal length");
  const int64_t S = T / B;
  const float *sp = scores.data_ptr<float>(), *lp = logits.data_ptr<float>();
  const int64_t* ip = ids.data_ptr<int64_t>();
  std::vector<double> count(E), mass(E), seq_count(E), seq_mass(E);
  double seq_loss = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    std::fill(seq_count.begin(), seq_count.end(), 0.0);
    std::fill(seq_mass.begin(), seq_mass.end(), 0.0);
    add_counts_and_mass(sp, ip, b * S, (b + 1) * S, E, K, seq_count.data(), seq_mass.data());
    for (int64_t e = 0; e < E; ++e) {
      seq_loss += seq_count[e] * E / (static_cast<double>(K) * S) * (seq_mass[e] / S);
      count[e] += seq_count[e], mass[e] += seq_mass[e];
    }
  }
  double aux = 0.0;
  for (int64_t e = 0; e < E; ++e) aux += count[e] / (static_cast<double>(T) * K) * (mass[e] / T);
  // z-loss: logsumexp from the softmax pass (the probabilities go to a scratch row)
  double z_sum = 0.0;
  std::vector<float> scratch(E);
  for (int64_t t = 0; t < T; ++t) {
    const auto [max, sum] = softmax_row(lp + t * E, scratch.data(), E);
    const double lse = max + std::log(static_cast<double>(sum));
    z_sum += lse * lse;
  }
  Tensor out = at::empty({3}, scores.options());
  float* op = out.data_ptr<float>();
  op[0] = static_cast<float>(E * aux), op[1] = static_cast<float>(seq_loss / B), op[2] = static_cast<float>(z_sum / T);
  return out;
}

// switch_aux_loss of workbench/moe/balance.py for routing without padding, forward and backward:
//     L = E * sum_e f_e P_e,  f_e = count_e / (T K),  P_e = mean_t s_te / sigma_t,  sigma_t = sum_j s_tj
// Forward returns (L (), f (E,)); f carries no gradient. Backward: dL/ds_te = grad * E / T *
// (f_e - sum_j f_j s_tj / sigma_t) / sigma_t, the quotient rule of s_te / sigma_t.
std::vector<Tensor> switch_aux_forward(const Tensor& scores, const Tensor& ids) {
  check_float_matrix(scores, "scores");
  check_ids(ids, scores);
  const int64_t T = scores.size(0), E = scores.size(1), K = ids.size(1);
  std::vector<double> count(E), mass(E);
  add_counts_and_mass(scores.data_ptr<float>(), ids.data_ptr<int64_t>(), 0, T, E, K, count.data(), mass.data());
  Tensor f = at::empty({E}, scores.options());
  float* fp = f.data_ptr<float>();
  double loss = 0.0;
  for (int64_t e = 0; e < E; ++e) {
    const double f_e = count[e] / std::max<double>(1.0, static_cast<double>(T) * K);
    fp[e] = static_cast<float>(f_e);
    loss += f_e * mass[e] / std::max<int64_t>(1, T);
  }
  return {at::full({}, static_cast<float>(E * loss), scores.options()), f};
}

Tensor switch_aux_backward(const Tensor& grad, const Tensor& scores, const Tensor& f) {
  check_float_matrix(scores, "scores");
  const int64_t T = scores.size(0), E = scores.size(1);
  const float scale = grad.item<float>() * E / std::max<int64_t>(1, T);
  Tensor grad_scores = at::empty_like(scores);
  const float *sp = scores.data_ptr<float>(), *fp = f.data_ptr<float>();
  float* gp = grad_scores.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* s = sp + t * E;
    float sigma = 0.0f, fs = 0.0f;
    for (int64_t e = 0; e < E; ++e) sigma += s[e], fs += fp[e] * s[e];
    const float inv = 1.0f / sigma, mean_f = fs * inv;
    for (int64_t e = 0; e < E; ++e) gp[t * E + e] = scale * (fp[e] - mean_f) * inv;
  }
  return grad_scores;
}
