// Python entry point of each flashsloth_kernels.<op>._C extension. The kernels themselves register
// as torch ops (namespace flashsloth_C) from their own files through
// TORCH_LIBRARY_FRAGMENT, so importing this module is all it takes to load them.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flashsloth-kernels C++ CPU kernels (ops live under torch.ops.flashsloth_C)";
}
