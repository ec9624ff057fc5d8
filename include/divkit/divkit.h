// divkit: divergence-based training objectives for language models. Umbrella header: every
// family's public API.
#pragma once

#include "divkit/compare.h"
#include "divkit/distill.h"
#include "divkit/divergence.h"
#include "divkit/fused_linear.h"
#include "divkit/host_cache.h"
#include "divkit/kde.h"
#include "divkit/ot.h"
#include "divkit/preference.h"
#include "divkit/rlhf.h"
#include "divkit/runtime.h"
#include "divkit/sparse.h"
#include "divkit/tensor.h"
#include "divkit/vocab_parallel.h"
