// divkit from C++: distil a "teacher" distribution into free student logits by gradient descent,
// calling divkit::divergence on raw buffers described by TensorViews.
//
// Build against an installed divkit (see CMakeLists.txt next to this file) and run:
//   distill_logits            prints the loss per step; exits 1 if anything is off.
#include <divkit/divkit.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

int main() {
  constexpr int64_t N = 6;   // tokens (rows)
  constexpr int64_t V = 50;  // vocabulary (columns)

  // Deterministic teacher and student logits, row-major [N, V].
  std::vector<float> teacher(N * V), student(N * V, 0.0f), grad(N * V);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < V; ++j)
      teacher[i * V + j] = 3.0f * std::sin(0.37f * static_cast<float>(j * (i + 1)));
  // The last token is padding: its label is ignore_index, so it is neither read nor counted.
  std::vector<int64_t> labels(N, 0);
  labels[N - 1] = -100;

  divkit::DivergenceSpec spec;
  spec.kind = divkit::parse_divergence_kind("jsd");  // or DivergenceKind::jsd
  spec.beta = 0.5f;
  spec.temperature = 1.0f;

  divkit::DivergenceOptions options;
  options.labels = divkit::TensorView::vector(labels.data(), divkit::DType::i64, N);
  options.ignore_index = -100;
  options.reduction = divkit::Reduction::mean;  // sum over the 5 non-ignored tokens / 5

  float loss = 0.0f;
  divkit::DivergenceOutputs outputs;
  outputs.loss = divkit::TensorView::vector(&loss, divkit::DType::f32, 1);
  outputs.grad_student = divkit::TensorView::matrix(grad.data(), divkit::DType::f32, N, V);

  const auto s = divkit::TensorView::matrix(student.data(), divkit::DType::f32, N, V);
  const auto t = divkit::TensorView::matrix(teacher.data(), divkit::DType::f32, N, V);

  std::printf("divkit %s, SIMD target %s, %d threads\n", divkit::version().c_str(),
              divkit::active_simd_target().c_str(), divkit::get_num_threads());
  float first = 0.0f;
  for (int step = 0; step <= 200; ++step) {
    divkit::divergence(s, t, spec, options, outputs);  // loss and d loss / d student
    if (step == 0) first = loss;
    if (step % 40 == 0) std::printf("step %3d  jsd(beta=0.5) = %.6f\n", step, loss);
    for (int64_t k = 0; k < N * V; ++k) student[k] -= 20.0f * grad[k];
  }
  // The ignored row gets a zero gradient, so its logits never move.
  for (int64_t j = 0; j < V; ++j)
    if (student[(N - 1) * V + j] != 0.0f) {
      std::printf("error: the ignored row was updated\n");
      return 1;
    }

  // The convenience entry point: contiguous fp32, forward KL(p_teacher || q_student).
  divkit::DivergenceSpec fkl;
  fkl.kind = divkit::DivergenceKind::forward_kl;
  const float kl = divkit::divergence_f32(student.data(), teacher.data(), N - 1, V, fkl);
  std::printf("after distillation: forward KL(p_teacher || q_student) = %.6f per token\n", kl);

  // Bad arguments throw divkit::Error, whose message names the argument.
  try {
    fkl.temperature = -1.0f;
    divkit::divergence_f32(student.data(), teacher.data(), N, V, fkl);
    std::printf("error: a negative temperature was accepted\n");
    return 1;
  } catch (const divkit::Error& e) {
    std::printf("divkit::Error as expected: %s\n", e.what());
  }

  if (!(loss < 0.1f * first) || !(kl < 0.1f) || !std::isfinite(kl)) {
    std::printf("error: the student did not converge (loss %g -> %g, KL %g)\n", first, loss, kl);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
