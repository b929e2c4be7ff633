// Which fused attention libtorch may pick on CUDA.
//
// cuDNN's attention (PyTorch's first choice for bf16/f16 on Hopper since 2.5) compiles and
// plans its kernels for each new key length, and a decoding sequence's key length grows by
// one every step: on an H200, SmolLM2-135M in bf16 decoded 25 tokens/s with it against 168
// in f32 (which cuDNN's attention does not take). With it off, libtorch picks memory-
// efficient attention (flash takes no mask), which takes any length (docs/benchmarks.md).

#include <ATen/Context.h>

extern "C" {

void ludus_disable_cudnn_attention() { at::globalContext().setSDPUseCuDNN(false); }

int ludus_cudnn_attention_enabled() { return at::globalContext().userEnabledCuDNNSDP() ? 1 : 0; }

}  // extern "C"
