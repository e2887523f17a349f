// Torch binding of the SAP CUDA forward: the CUDA kernel of
// torch.ops.flashsloth.spatial_attention_pool_fwd.
//
// The scorer GEMM z = x @ w1^T runs in cuBLAS (at::mm, the floor the benchmark compares with);
// one fused kernel then does everything else (bias, ReLU, dropout mask, the dot with w2, the
// window softmax and the weighted sum of x), so the small ops cost one launch and no
// intermediate tensor besides z. z is fp32 for every x dtype (the numeric contract,
// docs/contract.md: fp32 accumulation and fp32 intermediates; a 16-bit z overflows for float16
// |x| near 65504): for 16-bit x the GEMM reads 16-bit operands and writes fp32 (torch's
// mm.dtype_out, cuBLAS with an fp32 output). For large batches z is computed a chunk of images
// at a time into one reused buffer (bounded memory; the chunk size is a tuning knob for
// keeping z in L2 between the GEMM and the epilogue).
//
// Compiled only by the real CUDA build (setup.py's CUDAExtension or the JIT build in
// flashsloth_kernels/_cuda_ext.py); CI syntax-checks it (scripts/check_cuda_compile.sh).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "sap_cuda.cuh"

namespace flashsloth_cuda {
namespace {

// Prefix of every error message: the op whose CUDA kernel this is.
constexpr const char* kOp = "spatial_attention_pool_fwd (cuda): ";

// z of all images at once up to this size; larger batches are cut into chunks of images.
constexpr int64_t kMaxScoreBufferBytes = int64_t{256} << 20;
constexpr int64_t kDefaultSmemBytes = 48 * 1024;

Dtype sap_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return Dtype::kFloat32;
    case at::kHalf:
      return Dtype::kFloat16;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, kOp, "x: expected dtype float32, float16 or bfloat16, got ",
                  x.scalar_type());
  }
}

void check_like_x(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), kOp, name, ": expected a tensor on ",
              x.device(), " (x's device), got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), kOp, name,
              ": expected dtype ", x.scalar_type(), " (x's dtype), got ", t.scalar_type());
}

at::Tensor sap_fwd_cuda(const at::Tensor& x, const at::Tensor& w1,
                        const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                        const std::optional<at::Tensor>& b2, int64_t kh, int64_t kw, int64_t H,
                        int64_t W, const std::optional<at::Tensor>& dropout_mask,
                        double dropout_scale, int64_t images_per_chunk) {
  TORCH_CHECK(x.is_cuda(), kOp, "x: expected a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 3, kOp, "x: expected shape (B, N, C), got ", x.sizes());
  const Dtype dtype = sap_dtype(x);
  TORCH_CHECK(H >= 1 && W >= 1 && H <= INT32_MAX && W <= INT32_MAX,
              kOp, "H, W: expected ints >= 1, got H = ", H, ", W = ", W);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(N == H * W, kOp, "x: expected shape (B, H * W, C) = (*, ", H * W,
              ", *), got ", x.sizes());
  TORCH_CHECK(C >= 1 && C <= INT32_MAX, kOp, "x: channels C must be in [1, 2^31), got ",
              C);
  // A window larger than the grid holds the patches that exist (the contract's partial
  // windows, as the original loop): the kernel clips every window to the grid.
  TORCH_CHECK(kh >= 1 && kw >= 1 && kh <= INT32_MAX && kw <= INT32_MAX, kOp,
              "kh, kw: expected ints >= 1, got (", kh, ", ", kw, ")");

  check_like_x("w1", w1, x);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C, kOp, "w1: expected shape (Ch, ", C,
              "), got ", w1.sizes());
  const int64_t Ch = w1.size(0);
  TORCH_CHECK(Ch >= 1 && Ch <= INT32_MAX, kOp, "w1: Ch must be in [1, 2^31), got ", Ch);
  check_like_x("w2", w2, x);
  TORCH_CHECK(w2.dim() == 1 && w2.size(0) == Ch, kOp, "w2: expected shape (", Ch,
              ",), got ", w2.sizes());
  if (b1.has_value()) {
    check_like_x("b1", *b1, x);
    TORCH_CHECK(b1->dim() == 1 && b1->size(0) == Ch, kOp, "b1: expected shape (", Ch,
                ",), got ", b1->sizes());
  }
  if (b2.has_value()) {
    check_like_x("b2", *b2, x);
    TORCH_CHECK(b2->numel() == 1, kOp, "b2: expected one element, got shape ",
                b2->sizes());
  }
  if (dropout_mask.has_value()) {
    TORCH_CHECK(dropout_mask->device() == x.device(), kOp, "dropout_mask: expected a ",
                "tensor on ", x.device(), " (x's device), got ", dropout_mask->device());
    TORCH_CHECK(dropout_mask->scalar_type() == at::kBool,
                kOp, "dropout_mask: expected dtype bool, got ",
                dropout_mask->scalar_type());
    TORCH_CHECK(dropout_mask->dim() == 3 && dropout_mask->size(0) == B &&
                    dropout_mask->size(1) == N && dropout_mask->size(2) == Ch,
                kOp, "dropout_mask: expected shape (", B, ", ", N, ", ", Ch, "), got ",
                dropout_mask->sizes());
    TORCH_CHECK(std::isfinite(dropout_scale) && dropout_scale > 0.0,
                kOp, "dropout_scale: expected a finite float > 0, got ", dropout_scale);
  }
  TORCH_CHECK(images_per_chunk >= 0, kOp, "images_per_chunk: expected >= 0 (0 = auto),",
              " got ", images_per_chunk);

  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t Gh = (H + kh - 1) / kh, Gw = (W + kw - 1) / kw;
  at::Tensor out = at::empty({B, Gh * Gw, C}, x.options());
  if (B == 0) return out;

  const int64_t smem = std::min(kh, H) * std::min(kw, W) * static_cast<int64_t>(sizeof(float));
  if (smem > kDefaultSmemBytes) {
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                          x.device().index()));
    TORCH_CHECK(smem + 256 <= optin, kOp, "kh, kw: a window of ", kh, " x ", kw,
                " patches needs ", smem, " bytes of shared memory for its scores; this device ",
                "allows ", optin, " (use the triton or reference backend)");
  }

  const at::Tensor xc = x.contiguous();
  const at::Tensor w2c = w2.contiguous();
  const at::Tensor b1c = b1.has_value() ? b1->contiguous() : at::Tensor();
  const at::Tensor b2c = b2.has_value() ? b2->reshape({1}).contiguous() : at::Tensor();
  const at::Tensor maskc =
      dropout_mask.has_value() ? dropout_mask->contiguous() : at::Tensor();
  const at::Tensor w1t = w1.t();  // a view: cuBLAS takes the transpose without a copy

  int64_t chunk = images_per_chunk;
  if (chunk == 0) {
    const int64_t z_image_bytes = N * Ch * static_cast<int64_t>(sizeof(float));
    chunk = std::max<int64_t>(1, kMaxScoreBufferBytes / std::max<int64_t>(1, z_image_bytes));
  }
  chunk = std::min(chunk, B);
  TORCH_CHECK(chunk * Gh * Gw <= INT32_MAX, kOp, "images_per_chunk: ", chunk,
              " images of ", Gh * Gw, " windows exceed the grid limit; pass a smaller chunk");
  at::Tensor z = at::empty({chunk * N, Ch}, x.options().dtype(at::kFloat));  // fp32 always
  const bool lowp = x.scalar_type() != at::kFloat;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t x_image = N * C, out_image = Gh * Gw * C, mask_image = N * Ch;
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t nb = std::min(chunk, B - b0);
    at::Tensor zc = z.narrow(0, 0, nb * N);
    const at::Tensor xb = xc.narrow(0, b0, nb).view({nb * N, C});
    if (lowp) {
      at::mm_out(zc, xb, w1t, at::kFloat);  // 16-bit operands, fp32 accumulation and output
    } else {
      at::mm_out(zc, xb, w1t);
    }

    SapEpilogueArgs args;
    args.z = zc.data_ptr<float>();
    args.x = static_cast<const char*>(xc.data_ptr()) + b0 * x_image * xc.element_size();
    args.b1 = b1c.defined() ? b1c.data_ptr() : nullptr;
    args.w2 = w2c.data_ptr();
    args.b2 = b2c.defined() ? b2c.data_ptr() : nullptr;
    args.dropout_mask = maskc.defined()
                            ? reinterpret_cast<const uint8_t*>(maskc.data_ptr<bool>()) + b0 * mask_image
                            : nullptr;
    args.dropout_scale = static_cast<float>(dropout_scale);
    args.out = static_cast<char*>(out.data_ptr()) + b0 * out_image * out.element_size();
    args.B = nb;
    args.H = static_cast<int>(H);
    args.W = static_cast<int>(W);
    args.C = static_cast<int>(C);
    args.Ch = static_cast<int>(Ch);
    args.kh = static_cast<int>(kh);
    args.kw = static_cast<int>(kw);
    C10_CUDA_CHECK(sap_fwd_epilogue_launch(dtype, args, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace
}  // namespace flashsloth_cuda

// The schema is defined once for every device by flashsloth_kernels/sap/op.py
// (fused.define_kernels); csrc/sap/sap_cpu.cpp registers the CPU kernel.
TORCH_LIBRARY_IMPL(flashsloth, CUDA, m) {
  m.impl("spatial_attention_pool_fwd",
         [](const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
            const at::Tensor& w2, const std::optional<at::Tensor>& b2, int64_t kh, int64_t kw,
            int64_t H, int64_t W, const std::optional<at::Tensor>& dropout_mask,
            double dropout_scale, bool /*lowp_gemm: CPU only*/, int64_t images_per_chunk) {
           return flashsloth_cuda::sap_fwd_cuda(x, w1, b1, w2, b2, kh, kw, H, W, dropout_mask,
                                                dropout_scale, images_per_chunk);
         });
}
