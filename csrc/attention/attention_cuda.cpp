// Torch binding of the query-to-patch attention CUDA forward: the CUDA kernel of
// torch.ops.flashsloth.query_patch_attention_fwd.
//
// Returns (out, lse) as the contract of flashsloth_kernels/attention says: out (B, H, Lq, Dv) in
// q's dtype, lse (B, H, Lq) float32, +inf on rows whose keys are all masked (out 0 there).
// With a key split (small batches: fill the GPU) the forward kernel writes fp32 partials and a
// second launch merges them; otherwise one launch writes out and lse directly.
//
// Compiled only by the real CUDA build (setup.py's CUDAExtension or the JIT build in
// flashsloth_kernels/_cuda_ext.py); CI syntax-checks it (scripts/check_cuda_compile.sh).
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attention_cuda.cuh"

namespace flashsloth_cuda {
namespace {

// Prefix of every error message: the op whose CUDA kernel this is.
constexpr const char* kOp = "query_patch_attention_fwd (cuda): ";

Dtype attn_dtype(const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat:
      return Dtype::kFloat32;
    case at::kHalf:
      return Dtype::kFloat16;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, kOp, "q: expected dtype float32, float16 or bfloat16, got ",
                  q.scalar_type());
  }
}

void check_like_q(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), kOp, name, ": expected a tensor on ",
              q.device(), " (q's device), got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), kOp, name, ": expected dtype ",
              q.scalar_type(), " (q's dtype), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, kOp, name, ": expected a 4-D tensor (B, H, L, D), got ",
              t.sizes());
}

std::tuple<at::Tensor, at::Tensor> attn_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& key_padding_mask,
                                                 double scale, int64_t num_splits) {
  TORCH_CHECK(q.is_cuda(), kOp, "q: expected a CUDA tensor, got device ", q.device());
  TORCH_CHECK(q.dim() == 4, kOp, "q: expected shape (B, H, Lq, Dk), got ", q.sizes());
  const Dtype dtype = attn_dtype(q);
  check_like_q("k", k, q);
  check_like_q("v", v, q);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Dk = q.size(3);
  const int64_t Lk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == Dk,
              kOp, "k: expected shape (", B, ", ", H, ", Lk, ", Dk, "), got ", k.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == Lk,
              kOp, "v: expected shape (", B, ", ", H, ", ", Lk, ", Dv), got ", v.sizes());
  TORCH_CHECK(Dk >= 1 && Dk <= kAttnMaxHeadDim, kOp, "q: head dim Dk must be in [1, ",
              kAttnMaxHeadDim, "], got ", Dk);
  TORCH_CHECK(Dv >= 1 && Dv <= kAttnMaxHeadDim, kOp, "v: head dim Dv must be in [1, ",
              kAttnMaxHeadDim, "], got ", Dv);
  TORCH_CHECK(Lq >= 1 && Lq <= int64_t{65535} * kAttnMaxBlockM,
              kOp, "q: Lq must be in [1, ", int64_t{65535} * kAttnMaxBlockM, "], got ", Lq);
  TORCH_CHECK(Lk >= 1 && Lk <= INT32_MAX, kOp, "k: Lk must be in [1, 2^31), got ", Lk);
  TORCH_CHECK(B * H * Lq <= INT32_MAX, kOp, "q: B * H * Lq = ", B * H * Lq,
              " exceeds the grid limit 2^31 - 1");
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.device() == q.device(), kOp, "key_padding_mask: expected a tensor on ",
                q.device(), " (q's device), got ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool,
                kOp, "key_padding_mask: expected dtype bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == Lk,
                kOp, "key_padding_mask: expected shape (", B, ", ", Lk, "), got ",
                m.sizes());
  }
  TORCH_CHECK(std::isfinite(scale) && scale > 0.0,
              kOp, "scale: expected a finite float > 0, got ", scale);
  TORCH_CHECK(num_splits >= 0 && num_splits <= kAttnMaxSplits, kOp, "num_splits: ",
              "expected 0 (choose) or 1..", kAttnMaxSplits, ", got ", num_splits);

  const c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor out = at::empty({B, H, Lq, Dv}, q.options());
  at::Tensor lse = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  if (B * H == 0) return {out, lse};

  const int device = q.device().index();
  int sm_count = 0, max_smem = 0;
  C10_CUDA_CHECK(attn_device_facts(device, &sm_count, &max_smem));
  const AttnFwdPlan plan =
      attn_fwd_make_plan(B * H, static_cast<int>(Lq), static_cast<int>(Lk), static_cast<int>(Dk),
                         static_cast<int>(Dv), static_cast<int>(num_splits), sm_count, max_smem);
  TORCH_CHECK(plan.smem_bytes > 0, kOp, "q, v: head dims Dk = ", Dk, ", Dv = ", Dv,
              " need more shared memory than this device allows per block (", max_smem,
              " bytes); use the triton or reference backend");

  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor maskc;
  if (key_padding_mask.has_value()) maskc = key_padding_mask->contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  AttnFwdArgs args{};
  args.q = qc.data_ptr();
  args.k = kc.data_ptr();
  args.v = vc.data_ptr();
  args.mask = maskc.defined() ? reinterpret_cast<const uint8_t*>(maskc.data_ptr<bool>()) : nullptr;
  args.BH = B * H;
  args.H = static_cast<int>(H);
  args.Lq = static_cast<int>(Lq);
  args.Lk = static_cast<int>(Lk);
  args.Dk = static_cast<int>(Dk);
  args.Dv = static_cast<int>(Dv);
  args.qk_scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  if (plan.num_splits == 1) {
    args.out = out.data_ptr();
    args.lse = lse.data_ptr<float>();
    C10_CUDA_CHECK(attn_fwd_launch(dtype, args, plan, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {out, lse};
  }

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor part_o = at::empty({B * H, plan.num_splits, Lq, Dv}, f32);
  at::Tensor part_lse = at::empty({B * H, plan.num_splits, Lq}, f32);
  args.part_o = part_o.data_ptr<float>();
  args.part_lse = part_lse.data_ptr<float>();
  C10_CUDA_CHECK(attn_fwd_launch(dtype, args, plan, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  AttnCombineArgs comb{};
  comb.part_o = part_o.data_ptr<float>();
  comb.part_lse = part_lse.data_ptr<float>();
  comb.out = out.data_ptr();
  comb.lse = lse.data_ptr<float>();
  comb.BH = B * H;
  comb.Lq = static_cast<int>(Lq);
  comb.Dv = static_cast<int>(Dv);
  comb.num_splits = plan.num_splits;
  C10_CUDA_CHECK(attn_fwd_combine_launch(dtype, comb, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace
}  // namespace flashsloth_cuda

// The schema is defined once for every device by flashsloth_kernels/attention/op.py
// (fused.define_kernels); csrc/attention/attention_cpu.cpp registers the CPU kernel.
TORCH_LIBRARY_IMPL(flashsloth, CUDA, m) {
  m.impl("query_patch_attention_fwd", &flashsloth_cuda::attn_fwd_cuda);
}
