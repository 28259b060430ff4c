// The Python bindings of the fused CPU kernels (workbench/kernels/cpu/build.py builds the three
// files of this folder as one extension; the kernels themselves are in the other two).

#include <torch/extension.h>

#include <optional>
#include <vector>

#include "vec_math.h"

using at::Tensor;

// swiglu_experts_cpu.cpp
std::vector<Tensor> swiglu_experts_forward(const Tensor& x, const std::optional<Tensor>& token, const Tensor& w1,
                                           const Tensor& w3, const Tensor& w2, const std::vector<int64_t>& counts);
std::vector<Tensor> swiglu_experts_backward(const Tensor& grad_out, const Tensor& x, const std::optional<Tensor>& token,
                                            const std::optional<Tensor>& row_weight, const std::optional<Tensor>& out,
                                            const Tensor& gate, const Tensor& up, const Tensor& w1, const Tensor& w3,
                                            const Tensor& w2, const std::vector<int64_t>& counts);
// routing_cpu.cpp
std::vector<Tensor> softmax_topk_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                         int64_t k, bool normalize);
std::vector<Tensor> softmax_topk_backward(const std::optional<Tensor>& grad_logits, const std::optional<Tensor>& grad_probs,
                                          const std::optional<Tensor>& grad_gates, const Tensor& x, const Tensor& weight,
                                          const Tensor& probs, const Tensor& ids, const Tensor& gates, bool normalize);
std::vector<Tensor> sort_pairs_by_expert(const Tensor& ids, int64_t num_experts);
std::vector<Tensor> switch_aux_forward(const Tensor& scores, const Tensor& ids);
Tensor switch_aux_backward(const Tensor& grad, const Tensor& scores, const Tensor& f);
Tensor balance_loss_values(const Tensor& scores, const Tensor& ids, const Tensor& logits, int64_t num_sequences);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("swiglu_experts_forward", &swiglu_experts_forward, "fused SwiGLU experts, forward (CPU)");
  m.def("swiglu_experts_backward", &swiglu_experts_backward, "fused SwiGLU experts, backward (CPU)");
  m.def("softmax_topk_forward", &softmax_topk_forward, "softmax top-k router, forward (CPU)");
  m.def("softmax_topk_backward", &softmax_topk_backward, "softmax top-k router, backward (CPU)");
  m.def("sort_pairs_by_expert", &sort_pairs_by_expert, "stable counting sort of token-expert pairs (CPU)");
  m.def("switch_aux_forward", &switch_aux_forward, "Switch load-balancing loss, forward (CPU)");
  m.def("switch_aux_backward", &switch_aux_backward, "Switch load-balancing loss, backward (CPU)");
  m.def("balance_loss_values", &balance_loss_values, "the three balancing losses' values, no gradient (CPU)");
  m.def("set_simd", [](bool allowed) { workbench_simd::simd_allowed() = allowed; },
        "let the kernels' AVX2 loops run (where the CPU has AVX2 + FMA) or not");
  m.def("simd_allowed", [] { return workbench_simd::simd_allowed().load(); }, "see set_simd");
}
