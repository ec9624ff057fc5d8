#include "fused_linear/head_grads.h"

#include <algorithm>

#include "core/gemm.h"
#include "core/gemm_pieces.h"
#include "divkit/runtime.h"
#include "fused_linear/arguments.h"

namespace divkit::fused {

HeadGradAccumulator::HeadGradAccumulator(const LinearHead& head, const LinearHeadGrads& grads,
                                         WeightBlocks* weight, int64_t v,
                                         const std::vector<int64_t>* row_ids,
                                         const ShardGroup* group)
    : head_(head), grads_(grads), weight_(weight), row_ids_(row_ids),
      group_(group != nullptr && group->on() ? group : nullptr), v_(v) {
  h_ = head.weight.shape[1];
  if (grads.weight.defined()) {
    if (row_ids == nullptr && is_direct_f32(grads.weight)) {
      dw_ = static_cast<float*>(grads.weight.data);
      ldw_ = grads.weight.strides[0];
    } else {
      dw_owned_.assign(static_cast<size_t>(v_ * h_), 0.0f);
      dw_ = dw_owned_.data();
      ldw_ = h_;
    }
  }
  if (grads.bias.defined()) db_.assign(static_cast<size_t>(v_), 0.0);
}

void HeadGradAccumulator::add_chunk(const float* g, int64_t ldg, int64_t r0, int64_t rows,
                                    const F32Matrix& h, std::vector<float>& scratch) {
  if (grads_.hidden.defined()) {
    const TensorView& out = grads_.hidden;
    const bool direct = is_direct_f32(out) && group_ == nullptr;
    float* dst = direct ? static_cast<float*>(out.data) + r0 * out.strides[0] : nullptr;
    const int64_t ldd = direct ? out.strides[0] : h_;
    if (!direct) {
      scratch.resize(static_cast<size_t>(rows * h_));
      dst = scratch.data();
    }
    weight_->times_weight(g, ldg, rows, dst, ldd);
    if (group_ != nullptr) {
      // Summed in fp64 over the ranks, then rounded once.
      reduce_buffer_.assign(scratch.begin(), scratch.begin() + rows * h_);
      group_->sum(reduce_buffer_.data(), rows * h_);
      std::copy(reduce_buffer_.begin(), reduce_buffer_.end(), scratch.begin());
    }
    if (!direct)
      for (int64_t r = 0; r < rows; ++r) store_row(out, r0 + r, scratch.data() + r * h_, h_);
  }
  if (dw_ != nullptr) {
    // grad_weight += g^T h, in pieces of vocabulary rows.
    const int64_t pr = gemm::piece_rows(v_, h_);
    gemm::for_pieces(weight_->threads(), (v_ + pr - 1) / pr, [&](int, int64_t p) {
      const int64_t j0 = p * pr, nr = std::min(pr, v_ - j0);
      gemm::atb(nr, h_, rows, 1.0f, g + j0, ldg, h.data, h.ld, first_ && !accumulate_ ? 0.0f : 1.0f,
                dw_ + j0 * ldw_, ldw_);
    });
  }
  if (!db_.empty()) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = g + r * ldg;
      for (int64_t j = 0; j < v_; ++j) db_[j] += row[j];
    }
  }
  first_ = false;
}

void HeadGradAccumulator::finish() {
  const int64_t v_full = head_.weight.shape[0];
  if (first_ && grads_.hidden.defined()) {
    const TensorView& out = grads_.hidden;
    for (int64_t r = 0; r < out.shape[0]; ++r)
      for (int64_t j = 0; j < out.shape[1]; ++j)
        elem::store(out.data, out.dtype, r * out.strides[0] + j * out.strides[1], 0.0);
  }
  if (grads_.weight.defined()) {
    const TensorView& out = grads_.weight;
    if (first_ && dw_owned_.empty() &&
        !accumulate_)  // no chunk ran (N = 0): the output still gets zeros
      for (int64_t r = 0; r < v_; ++r) std::fill(dw_ + r * ldw_, dw_ + r * ldw_ + h_, 0.0f);
    if (!dw_owned_.empty()) {
      if (row_ids_ != nullptr) {
        std::vector<float> full(static_cast<size_t>(v_full * h_), 0.0f);
        for (int64_t r = 0; r < v_; ++r) {
          float* dst = full.data() + (*row_ids_)[r] * h_;
          const float* src = dw_owned_.data() + r * h_;
          for (int64_t j = 0; j < h_; ++j) dst[j] += src[j];
        }
        dw_owned_.swap(full);
      }
      // 262M elements at 128256 x 2048: rows in parallel.
#pragma omp parallel for num_threads(get_num_threads()) \
    schedule(static) if (v_full * h_ >= (int64_t{1} << 20))
      for (int64_t r = 0; r < v_full; ++r) store_row(out, r, dw_owned_.data() + r * h_, h_);
    }
  }
  if (grads_.bias.defined()) {
    std::vector<double> full(static_cast<size_t>(v_full), 0.0);
    for (int64_t r = 0; r < v_; ++r) full[row_ids_ ? (*row_ids_)[r] : r] += db_[r];
    if (accumulate_)
      for (int64_t j = 0; j < v_full; ++j) full[j] += elem::get(grads_.bias, j);
    for (int64_t j = 0; j < v_full; ++j) elem::set(grads_.bias, j, full[j]);
  }
}

}  // namespace divkit::fused
