// The CUDA path of divkit::label_rows (label_cuda.cu), built with DIVKIT_CUDA: every view on one
// CUDA device `device` (label_rows.cc has checked the arguments and the placement), the kernel on
// args.stream.
#pragma once

#include "divkit/fused_linear.h"

namespace divkit::detail {

// The shape / dtype / option checks of label_rows, shared by both devices (label_rows.cc).
void check_label_rows(const char* fn, const LabelRowsArgs& args);

void label_rows_cuda(const char* fn, const LabelRowsArgs& args, int device);

}  // namespace divkit::detail
