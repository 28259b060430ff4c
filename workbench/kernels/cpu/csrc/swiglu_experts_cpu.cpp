// Fused SwiGLU experts on CPU: each thread runs whole expert FFNs, forward and backward.
//
//     out_e = (silu(x_e W1_e) * (x_e W3_e)) W2_e          for the rows x_e routed to expert e
//
// Why: on a few cores, splitting each small per-expert GEMM across all threads (what
// F.grouped_mm does) loses time to synchronisation, and the SwiGLU element-wise steps stream
// (rows x hidden) tensors through memory. Here the rows, sorted by expert, are cut into one
// equal contiguous range per thread; a thread runs the expert FFN on each expert's part of its
// range with single-threaded GEMMs, so the threads finish together and a segment's
// (rows x hidden) activations stay in cache between its GEMMs. An expert cut by a range
// boundary gets its weight gradient as the sum of the threads' partial sums. Results do not
// depend on timing: the partition is fixed by the counts. workbench/kernels/cpu/build.py builds
// this file; the tests check it against the readable reference.

#include <ATen/ATen.h>

#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

// at::parallel_for is inlined from the headers: without OpenMP here it would run serially.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "build with -fopenmp (torch's threads are OpenMP threads)"
#endif

#include <algorithm>
#include <array>
#include <numeric>
#include <optional>
#include <vector>

#include "vec_math.h"

using at::Tensor;

namespace {

// A piece of one expert's rows that falls in one thread's range.
struct Segment {
  int64_t expert, row, num_rows;
  bool whole_expert;  // false: the expert's rows are shared with another thread
};

// Cuts the rows (sorted by expert, counts[e] for expert e) into `parts` equal ranges and
// each range into per-expert segments.
std::vector<std::vector<Segment>> partition_rows(const std::vector<int64_t>& counts, int64_t parts) {
  const int64_t num_rows = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  std::vector<std::vector<Segment>> segments(parts);
  int64_t expert_start = 0;
  for (int64_t e = 0; e < static_cast<int64_t>(counts.size()); ++e) {
    const int64_t expert_end = expert_start + counts[e];
    for (int64_t p = 0; p < parts; ++p) {
      const int64_t lo = std::max(expert_start, num_rows * p / parts);
      const int64_t hi = std::min(expert_end, num_rows * (p + 1) / parts);
      if (lo < hi) segments[p].push_back({e, lo, hi - lo, hi - lo == counts[e]});
    }
    expert_start = expert_end;
  }
  return segments;
}

// Runs fn(segment, part) for every segment, one part per intra-op thread. Nested ATen ops
// (and MKL) inside at::parallel_for run single-threaded.
template <class Fn>
void for_each_segment(const std::vector<std::vector<Segment>>& segments, const Fn& fn) {
  at::parallel_for(0, static_cast<int64_t>(segments.size()), 1, [&](int64_t begin, int64_t end) {
    // a worker thread starts with autograd on, and the inputs may require grad: these are
    // plain kernels (the autograd Function around them is in ops.py)
    c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset_with_ADInplaceOrView);
    for (int64_t p = begin; p < end; ++p) {
      for (const Segment& s : segments[p]) fn(s, p);
    }
  });
}

int64_t num_parts(int64_t num_rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_rows));
}

void check_inputs(const Tensor& x, const Tensor& token, const Tensor& w1, const Tensor& w3, const Tensor& w2,
                  const std::vector<int64_t>& counts) {
  TORCH_CHECK(!token.defined() || (token.dim() == 1 && token.scalar_type() == at::kLong && token.is_contiguous() &&
                                   token.device().is_cpu()),
              "fused SwiGLU experts: token must be a contiguous 1-d int64 CPU tensor");
  const int64_t num_rows = token.defined() ? token.size(0) : x.size(0);
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 3 && w3.sizes() == w1.sizes() && w2.dim() == 3,
              "fused SwiGLU experts: x must be (N, D), w1 and w3 (E, D, H), w2 (E, H, D)");
  TORCH_CHECK(w1.size(0) == static_cast<int64_t>(counts.size()) && w2.size(0) == w1.size(0),
              "fused SwiGLU experts: one count per expert is required");
  TORCH_CHECK(x.size(1) == w1.size(1) && w2.size(1) == w1.size(2) && w2.size(2) == x.size(1),
              "fused SwiGLU experts: inner dimensions disagree");
  TORCH_CHECK(std::all_of(counts.begin(), counts.end(), [](int64_t c) { return c >= 0; }) &&
                  std::accumulate(counts.begin(), counts.end(), int64_t{0}) == num_rows,
              "fused SwiGLU experts: counts must be >= 0 and add up to the number of rows");
  for (const Tensor* t : {&x, &w1, &w3, &w2}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == x.scalar_type(),
                "fused SwiGLU experts: inputs must be contiguous CPU tensors of one dtype");
  }
}

// The SwiGLU's element-wise steps, each in one pass over a segment's (rows x hidden) block.
// fp32 on an AVX2 CPU runs the vector loops below; other dtypes and CPUs the ATen ops.
//     forward:   hidden = silu(gate) * up,  silu(g) = g sigmoid(g)
//     backward:  hidden (recomputed, for dW2), grad_up = grad_hidden silu(gate),
//                grad_gate = grad_hidden up sigmoid(g) (1 + g (1 - sigmoid(g)))   (torch's silu_backward)

#ifdef WORKBENCH_X86_SIMD
__attribute__((target("avx2,fma"))) inline __m256 sigmoid8(__m256 g) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, workbench_simd::exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}

__attribute__((target("avx2,fma"))) void swiglu_forward_avx2(const float* gate, const float* up, float* hidden,
                                                             int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    _mm256_storeu_ps(hidden + i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) hidden[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// grad_hidden is overwritten with grad_gate.
__attribute__((target("avx2,fma"))) void swiglu_backward_avx2(const float* gate, const float* up, float* grad_hidden,
                                                              float* hidden, float* grad_up, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i), u = _mm256_loadu_ps(up + i), gh = _mm256_loadu_ps(grad_hidden + i);
    const __m256 s = sigmoid8(g), act = _mm256_mul_ps(g, s);
    _mm256_storeu_ps(hidden + i, _mm256_mul_ps(act, u));
    _mm256_storeu_ps(grad_up + i, _mm256_mul_ps(gh, act));
    const __m256 dsilu = _mm256_mul_ps(s, _mm256_fmadd_ps(g, _mm256_sub_ps(one, s), one));
    _mm256_storeu_ps(grad_hidden + i, _mm256_mul_ps(_mm256_mul_ps(gh, u), dsilu));
  }
  for (; i < n; ++i) {
    const float g = gate[i], s = 1.0f / (1.0f + std::exp(-g)), act = g * s;
    hidden[i] = act * up[i];
    grad_up[i] = grad_hidden[i] * act;
    grad_hidden[i] = grad_hidden[i] * up[i] * (s * (1.0f + g * (1.0f - s)));
  }
}
#endif

// The upstream gradient of rows [row, row + n) of a weighted combine, in one pass per row:
//     g[i] = grad_y[token[row + i]] * weight[row + i],  grad_weight[row + i] = <grad_y[token[row + i]], out[row + i]>
__attribute__((always_inline)) inline void weighted_row_gradients_impl(const float* grad_y, const int64_t* token,
                                                                       const float* weight, const float* out,
                                                                       int64_t row, int64_t n, int64_t D, float* g,
                                                                       float* grad_weight) {
  for (int64_t i = 0; i < n; ++i) {
    const float *src = grad_y + token[row + i] * D, *o = out + (row + i) * D;
    const float w = weight[row + i];
    float* gi = g + i * D;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += src[d] * o[d], gi[d] = src[d] * w;
    grad_weight[row + i] = dot;
  }
}

#ifdef WORKBENCH_X86_SIMD
__attribute__((target("avx2,fma"))) void weighted_row_gradients_avx2(const float* grad_y, const int64_t* token,
                                                                    const float* weight, const float* out, int64_t row,
                                                                    int64_t n, int64_t D, float* g, float* grad_weight) {
  weighted_row_gradients_impl(grad_y, token, weight, out, row, n, D, g, grad_weight);
}
#endif

// g (n, D) for the segment's rows; their weights' gradients go to grad_weight.
Tensor weighted_row_gradients(const Tensor& grad_y, const Tensor& token, const Tensor& weight, const Tensor& out,
                              int64_t row, int64_t n, Tensor& grad_weight) {
  if (grad_y.scalar_type() != at::kFloat) {
    Tensor g = grad_y.index_select(0, token.narrow(0, row, n));
    Tensor gw = grad_weight.narrow(0, row, n);
    at::sum_out(gw, g * out.narrow(0, row, n), {1});
    return g * weight.narrow(0, row, n).unsqueeze(1);
  }
  const int64_t D = grad_y.size(1);
  Tensor g = at::empty({n, D}, grad_y.options());
  const float *gy = grad_y.data_ptr<float>(), *w = weight.data_ptr<float>(), *o = out.data_ptr<float>();
  const int64_t* tok = token.data_ptr<int64_t>();
#ifdef WORKBENCH_X86_SIMD
  if (workbench_simd::has_avx2()) {
    weighted_row_gradients_avx2(gy, tok, w, o, row, n, D, g.data_ptr<float>(), grad_weight.data_ptr<float>());
    return g;
  }
#endif
  weighted_row_gradients_impl(gy, tok, w, o, row, n, D, g.data_ptr<float>(), grad_weight.data_ptr<float>());
  return g;
}

bool vector_swiglu(const Tensor& t) {
#ifdef WORKBENCH_X86_SIMD
  return t.scalar_type() == at::kFloat && workbench_simd::has_avx2();
#else
  return false;
#endif
}

// hidden = silu(gate) * up; gate and up are contiguous (rows x H) blocks.
Tensor swiglu_hidden(const Tensor& gate, const Tensor& up) {
#ifdef WORKBENCH_X86_SIMD
  if (vector_swiglu(gate)) {
    Tensor hidden = at::empty_like(gate);
    swiglu_forward_avx2(gate.data_ptr<float>(), up.data_ptr<float>(), hidden.data_ptr<float>(), gate.numel());
    return hidden;
  }
#endif
  return at::silu(gate).mul_(up);
}

// From gate, up and grad_hidden (overwritten): (hidden, grad_gate, grad_up).
std::array<Tensor, 3> swiglu_backward(const Tensor& gate, const Tensor& up, Tensor grad_hidden) {
#ifdef WORKBENCH_X86_SIMD
  if (vector_swiglu(gate)) {
    Tensor hidden = at::empty_like(gate), grad_up = at::empty_like(gate);
    swiglu_backward_avx2(gate.data_ptr<float>(), up.data_ptr<float>(), grad_hidden.data_ptr<float>(),
                         hidden.data_ptr<float>(), grad_up.data_ptr<float>(), gate.numel());
    return {hidden, grad_hidden, grad_up};
  }
#endif
  const Tensor act = at::silu(gate);
  Tensor grad_up = grad_hidden * act;
  Tensor grad_gate = at::silu_backward(grad_hidden.mul_(up), gate);
  return {act * up, grad_gate, grad_up};
}

// Row n of the experts' input: x[token[n]] when rows are routed (token given), else x[n].
Tensor input_rows(const Tensor& x, const Tensor& token, int64_t row, int64_t num_rows) {
  return token.defined() ? x.index_select(0, token.narrow(0, row, num_rows)) : x.narrow(0, row, num_rows);
}

}  // namespace

// Forward. Returns (out, gate, up): out (N, D) holds expert_e(input row) for every row, sorted
// by expert; gate = input W1 and up = input W3 are kept for the backward. With `token` (N,)
// given, input row n is x[token[n]] (the permutation is fused in: no sorted copy of x is made).
std::vector<Tensor> swiglu_experts_forward(const Tensor& x, const std::optional<Tensor>& token,
                                           const Tensor& w1, const Tensor& w3, const Tensor& w2,
                                           const std::vector<int64_t>& counts) {
  const Tensor tok = token.value_or(Tensor());
  check_inputs(x, tok, w1, w3, w2, counts);
  const int64_t N = tok.defined() ? tok.size(0) : x.size(0), D = x.size(1), H = w1.size(2);
  Tensor out = at::empty({N, D}, x.options());
  Tensor gate = at::empty({N, H}, x.options());
  Tensor up = at::empty({N, H}, x.options());
  for_each_segment(partition_rows(counts, num_parts(N)), [&](const Segment& s, int64_t) {
    const Tensor x_s = input_rows(x, tok, s.row, s.num_rows);
    Tensor gate_s = gate.narrow(0, s.row, s.num_rows), up_s = up.narrow(0, s.row, s.num_rows);
    Tensor out_s = out.narrow(0, s.row, s.num_rows);
    at::mm_out(gate_s, x_s, w1[s.expert]);
    at::mm_out(up_s, x_s, w3[s.expert]);
    at::mm_out(out_s, swiglu_hidden(gate_s, up_s), w2[s.expert]);
  });
  return {out, gate, up};
}

// Backward. Returns (grad_rows, grad_row_weight, grad_w1, grad_w3, grad_w2); grad_rows (N, D)
// is the gradient of each input row (the caller sums a token's rows). Without `token`,
// grad_out is the gradient of `out`. With `token`, `row_weight` and `out`, the experts' outputs were
// combined as y[t] = sum over rows n of token t of row_weight[n] * out[n]; grad_out is the
// gradient of y, and the un-permutation, the weighting and the weights' gradient
// (grad_row_weight[n] = <grad_y[token[n]], out[n]>) are fused in.
// silu(gate) and the hidden are recomputed in cache.
std::vector<Tensor> swiglu_experts_backward(const Tensor& grad_out, const Tensor& x, const std::optional<Tensor>& token,
                                            const std::optional<Tensor>& row_weight, const std::optional<Tensor>& out,
                                            const Tensor& gate, const Tensor& up, const Tensor& w1, const Tensor& w3,
                                            const Tensor& w2, const std::vector<int64_t>& counts) {
  const Tensor tok = token.value_or(Tensor()), weight = row_weight.value_or(Tensor());
  const Tensor out_rows = out.value_or(Tensor());
  check_inputs(x, tok, w1, w3, w2, counts);
  const int64_t N = tok.defined() ? tok.size(0) : x.size(0), D = x.size(1), H = w1.size(2);
  TORCH_CHECK(tok.defined() == weight.defined() && weight.defined() == out_rows.defined(),
              "fused SwiGLU experts: token, row_weight and out come together");
  const auto matches = [](const Tensor& t, at::IntArrayRef sizes) { return t.sizes() == sizes && t.is_contiguous(); };
  TORCH_CHECK(matches(gate, {N, H}) && matches(up, {N, H}) && matches(grad_out, {tok.defined() ? x.size(0) : N, D}),
              "fused SwiGLU experts: grad_out, gate and up must be contiguous and match the forward");
  TORCH_CHECK(!weight.defined() || (matches(weight, {N}) && matches(out_rows, {N, D}) &&
                                    weight.scalar_type() == x.scalar_type()),
              "fused SwiGLU experts: row_weight (N,) in the dtype of x and out (N, D) must be contiguous");
  const auto segments = partition_rows(counts, num_parts(N));
  Tensor grad_rows = at::empty({N, D}, x.options());
  Tensor grad_row_weight = weight.defined() ? at::empty({N}, x.options()) : Tensor();
  Tensor grad_w1 = at::empty_like(w1), grad_w3 = at::empty_like(w3), grad_w2 = at::empty_like(w2);
  for (int64_t e = 0; e < static_cast<int64_t>(counts.size()); ++e) {
    if (counts[e] == 0) grad_w1[e].zero_(), grad_w3[e].zero_(), grad_w2[e].zero_();  // as in the reference
  }
  // a shared expert's partial sums, one slot per (part, first or last segment of the part)
  std::vector<std::array<Tensor, 3>> partial(2 * segments.size());

  for_each_segment(segments, [&](const Segment& s, int64_t part) {
    // upstream gradient of each row
    const Tensor g_s = weight.defined()
                           ? weighted_row_gradients(grad_out, tok, weight, out_rows, s.row, s.num_rows, grad_row_weight)
                           : input_rows(grad_out, tok, s.row, s.num_rows);
    const Tensor x_s = input_rows(x, tok, s.row, s.num_rows);
    const Tensor gate_s = gate.narrow(0, s.row, s.num_rows), up_s = up.narrow(0, s.row, s.num_rows);
    Tensor gw1, gw3, gw2;
    if (s.whole_expert) {
      gw1 = grad_w1[s.expert], gw3 = grad_w3[s.expert], gw2 = grad_w2[s.expert];
    } else {
      gw1 = at::empty_like(w1[0]), gw3 = at::empty_like(w3[0]), gw2 = at::empty_like(w2[0]);
      partial[2 * part + (s.row == segments[part].front().row ? 0 : 1)] = {gw1, gw3, gw2};
    }
    const auto [hidden, grad_gate, grad_up] = swiglu_backward(gate_s, up_s, at::mm(g_s, w2[s.expert].t()));
    at::mm_out(gw2, hidden.t(), g_s);  // dW2 = hidden^T g
    at::mm_out(gw1, x_s.t(), grad_gate);
    at::mm_out(gw3, x_s.t(), grad_up);
    Tensor grad_rows_s = grad_rows.narrow(0, s.row, s.num_rows);
    at::mm_out(grad_rows_s, grad_gate, w1[s.expert].t());
    grad_rows_s.addmm_(grad_up, w3[s.expert].t());
  });

  // sum the partial weight gradients of shared experts, in part order (deterministic)
  std::vector<bool> started(counts.size(), false);
  for (size_t p = 0; p < segments.size(); ++p) {
    for (int end = 0; end < 2; ++end) {
      const auto& sums = partial[2 * p + end];
      if (!sums[0].defined()) continue;
      const int64_t e = (end == 0 ? segments[p].front() : segments[p].back()).expert;
      Tensor grads[3] = {grad_w1[e], grad_w3[e], grad_w2[e]};
      for (int i = 0; i < 3; ++i) started[e] ? grads[i].add_(sums[i]) : grads[i].copy_(sums[i]);
      started[e] = true;
    }
  }
  return {grad_rows, grad_row_weight, grad_w1, grad_w3, grad_w2};
}
