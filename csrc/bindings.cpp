// Python bindings (pybind11) of the CPU prefix-attention kernels: prefixrt.ops.cpp_build loads this
// module with torch.utils.cpp_extension.load and prefixrt.ops.cpp_backend calls it.
// torch/csrc/utils/pybind.h (pybind11 + the Tensor casters) compiles in a quarter of the time of
// torch/extension.h, which pulls in the whole C++ frontend.
#include <torch/csrc/utils/pybind.h>

#include "prefix_attention.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prefixrt C++ CPU kernels: prefix attention reading a packed prefix bank in place";
  m.def("forward", &prefixrt::prefix_attention_forward, "prefix attention forward -> (out, lse)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("bank_k"), py::arg("bank_v"),
        py::arg("prefix_ids"), py::arg("bank_offsets"), py::arg("key_padding_mask"),
        py::arg("causal"), py::arg("scale"), py::arg("dropout"), py::arg("seed"), py::arg("offset"),
        py::arg("threshold"), py::arg("dropout_scale"));
  m.def("backward", &prefixrt::prefix_attention_backward,
        "prefix attention backward -> (dq, dk, dv, dbank_k, dbank_v)", py::arg("dout"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("bank_k"), py::arg("bank_v"),
        py::arg("prefix_ids"), py::arg("bank_offsets"), py::arg("key_padding_mask"),
        py::arg("causal"), py::arg("scale"), py::arg("dropout"), py::arg("seed"), py::arg("offset"),
        py::arg("threshold"), py::arg("dropout_scale"), py::arg("out"), py::arg("lse"),
        py::arg("needs"));
  m.def("dropout_mask", &prefixrt::dropout_mask,
        "dropout multipliers of elements (b, h, i, j) as the kernels draw them", py::arg("coords"),
        py::arg("heads"), py::arg("q_len"), py::arg("key_stride"), py::arg("seed"),
        py::arg("offset"), py::arg("threshold"), py::arg("dropout_scale"));
  m.def("philox_dropout", &prefixrt::philox_dropout,
        "elementwise dropout: element n kept iff Philox word 0 at counter offset + n >= threshold",
        py::arg("x"), py::arg("seed"), py::arg("offset"), py::arg("threshold"),
        py::arg("dropout_scale"));
  m.def("simd_isa", &prefixrt::simd_isa, "the SIMD path this build was compiled for");
}
