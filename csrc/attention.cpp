// Schema of the fused attention ops and the Python module that loads them (kernels: cpu/, cuda/).
#include <Python.h>
#include <torch/library.h>

// A bare module, so `import fused_mtl_attn._C` loads the library and runs the registrations below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef WITH_CUDA
  PyModule_AddIntConstant(module, "built_with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "built_with_cuda", 0);
#endif
  return module;
}
}

// Forward returns (out, context): context [..., m+1, d] holds S = v k^T (rows 0..m-1) and z = sum k (row m) in the
// accumulation dtype; autograd saves it (it is small) so backward needs no second reduction over the sources.
// Backward takes `out` only where its kernels use it (CUDA: b = -(g . out) / den); the CPU kernels get b from S^T g.
TORCH_LIBRARY(fused_mtl_attn, m) {
  m.def("cross_task(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)");
  m.def("cross_task_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? out, Tensor context) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("cross_scale(Tensor q, Tensor k, Tensor v, SymInt[] offsets) -> (Tensor, Tensor)");
  m.def("cross_scale_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? out, Tensor context, "
        "SymInt[] offsets) -> (Tensor, Tensor, Tensor)");
}
