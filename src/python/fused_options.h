// The options object of the fused linear-head and vocabulary-parallel bindings: one
// divkit._C.FusedLinearOptions per call (fields set by name from Python), converted once to the
// core's option structs, instead of dozens of positional arguments.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "bindings.h"
#include "divkit/fused_linear.h"
#include "divkit/vocab_parallel.h"

namespace divkit_py {

struct FusedLinearOptions {
  // The divergence (divergence.h).
  std::string kind = "forward_kl";
  double beta = 0.5, alpha = 0.1, temperature = 1.0;
  bool scale_by_t_squared = false;
  // Tokens and reduction.
  int64_t ignore_index = -100;
  std::string reduction = "mean";
  double num_items_in_batch = 0.0;  // <= 0: not given
  int64_t chunk_size = 0;           // 0: chosen from V
  // Distillation: hard and soft terms; the sparse teacher's tail.
  double hard_weight = 0.0, soft_weight = 1.0;
  std::string tail = "bucket";
  // Cross-entropy and log-probs.
  double label_smoothing = 0.0, z_loss_scale = 0.0, softcap = 0.0;
  int64_t topk = 0;
  // Vocabulary-parallel: all_reduce(buffer, op) is called (GIL held) with a float64 numpy array
  // viewing the core's buffer, to be reduced in place over the group, and op "sum" or "max";
  // None: not sharded.
  int rank = 0, world = 1;
  nb::object all_reduce = nb::none();
  // The core's CUDA loops (label heads, fused_linear_divergence) on CUDA tensors: the stream
  // (torch.cuda.current_stream(device).cuda_stream; 0 is the default stream) and whether the
  // checks are read back (CrossEntropySpec, DivergenceOptions).
  uint64_t stream = 0;
  bool check_finite = true;

  divkit::DivergenceSpec spec() const {
    return make_spec(kind, beta, alpha, temperature, scale_by_t_squared);
  }
  // The VocabShard of these options: its all_reduce re-acquires the GIL (the core runs without
  // it) and borrows the callable, which this object keeps alive for the call.
  divkit::VocabShard shard() const;
};

// Tensors of one head and of its gradients, as Python tuples (hidden, weight, bias). Any device:
// the core dispatches on it (the label heads have a CUDA chunk loop; the others raise Error for a
// tensor that is not on the CPU, naming it).
using OptIn = std::optional<AnyInArray>;
using OptOut = std::optional<AnyOutArray>;
using HeadArrays = std::tuple<AnyInArray, AnyInArray, OptIn>;
using GradArrays = std::tuple<OptOut, OptOut, OptOut>;

// The vocabulary-parallel bindings (vocab_parallel.cc), registered by register_fused_linear.
void register_vocab_parallel(nb::module_& m);

}  // namespace divkit_py
