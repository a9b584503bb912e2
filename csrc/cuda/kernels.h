// The CUDA pointwise kernels' launchers (kernels.cu). Each launches one grid-stride kernel over the step's
// rows * H elements on the current stream of the tensors' device; the caller holds a device guard.
#pragma once

#include "../step.h"

namespace fused_lstm::cuda {

void launch_forward_step(const CellForwardStep& step);
void launch_backward_step(const CellBackwardStep& step);

}  // namespace fused_lstm::cuda
