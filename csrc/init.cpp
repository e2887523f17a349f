// Python entry point of each flashsloth_kernels.<op>._C extension. The kernels themselves register
// as kernels of torch ops (namespace flashsloth, schemas defined by the op's op.py) from their own
// files through TORCH_LIBRARY_IMPL, so importing this module is all it takes to load them.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flashsloth-kernels C++ CPU kernels (kernels of torch.ops.flashsloth ops)";
}
