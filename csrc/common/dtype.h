// The element type of a CUDA kernel call, shared by every op's C interface (csrc/<op>/*_cuda.cuh)
// and binding. Plain C++ (no CUDA, no torch headers), so the interfaces stay includable by both.
#pragma once

namespace flashsloth_cuda {

// Element type of every floating-point tensor of one call (the ops enforce one dtype).
enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace flashsloth_cuda
