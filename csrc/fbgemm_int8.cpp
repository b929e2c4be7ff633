// Ludus: the libtorch functions behind PyTorch's dynamic int8 quantization that tch does
// not bind (fbgemm weight packing and the int8 GEMM). Compiled by build.rs against the
// same libtorch as tch; tensors cross as tch's raw handles (`at::Tensor*`), exactly as
// torch-sys passes them. Every function catches C++ exceptions and reports them through
// `ludus_last_error`, so a libtorch error becomes a Rust `Err`, never an abort.

#include <ATen/core/Tensor.h>
#include <ATen/ops/fbgemm_linear_int8_weight_fp32_activation.h>
#include <ATen/ops/fbgemm_linear_quantize_weight.h>
#include <ATen/ops/fbgemm_pack_quantized_matrix.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include <c10/util/Exception.h>

#include <exception>
#include <memory>
#include <string>

namespace {
thread_local std::string last_error;

// libtorch warns once per process that these functions are deprecated: true, and known
// (docs/lightweight-models.md), but not something a node owner can act on.
class Silent : public c10::WarningHandler {
 public:
  void process(const c10::Warning&) override {}
};

template <typename F>
int guarded(F&& body) {
  static Silent silent;
  c10::WarningUtils::WarningHandlerGuard quiet(&silent);
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return -1;
}
}  // namespace

extern "C" {

// The message of the last failed call on this thread (valid until the next call).
const char* ludus_last_error() { return last_error.c_str(); }

// 1 when this libtorch has fbgemm and this CPU runs it (x86-64 with AVX2): packing a
// tiny matrix throws otherwise. Probed once.
int ludus_fbgemm_available() {
  static const int available = [] {
    static Silent silent;
    c10::WarningUtils::WarningHandlerGuard quiet(&silent);
    try {
      auto [q, offsets, s, z] = at::fbgemm_linear_quantize_weight(at::ones({8, 8}));
      (void)at::fbgemm_pack_quantized_matrix(q);
      return 1;
    } catch (...) {
      return 0;
    }
  }();
  return available;
}

// Quantizes an f32 weight [out, in] to int8 (one scale and zero point for the tensor)
// and packs it for fbgemm. Outputs: the packed matrix, the column offsets, scale, zero.
int ludus_fbgemm_quantize_and_pack(const at::Tensor* weight, at::Tensor** packed, at::Tensor** col_offsets,
                                   double* scale, int64_t* zero_point) {
  return guarded([&] {
    auto [q, offsets, s, z] = at::fbgemm_linear_quantize_weight(weight->contiguous());
    // Both results are owned here until both exist: nothing leaks if one throws.
    auto packed_owned = std::make_unique<at::Tensor>(at::fbgemm_pack_quantized_matrix(q));
    auto offsets_owned = std::make_unique<at::Tensor>(offsets);
    *packed = packed_owned.release();
    *col_offsets = offsets_owned.release();
    *scale = s;
    *zero_point = z;
  });
}

// y = x W^T + bias with the packed int8 W; x is f32 [rows, in] and is quantized to uint8
// per call (dynamic quantization), the product accumulates in int32.
// libtorch reads only the shape of the int8 weight (the packed copy holds the values),
// so a zero-stride view of one byte stands in for it: no second copy of the matrix.
int ludus_fbgemm_linear(const at::Tensor* input, const at::Tensor* packed, const at::Tensor* col_offsets,
                        double scale, int64_t zero_point, const at::Tensor* bias, int64_t out_features,
                        int64_t in_features, at::Tensor** out) {
  return guarded([&] {
    at::Tensor unused_weight = at::zeros({1, 1}, at::kChar).expand({out_features, in_features});
    *out = new at::Tensor(at::fbgemm_linear_int8_weight_fp32_activation(
        *input, unused_weight, *packed, *col_offsets, scale, zero_point, *bias));
  });
}

}  // extern "C"
