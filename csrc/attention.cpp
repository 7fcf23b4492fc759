// Schema of the fused attention ops and the Python module that loads them (kernels: cpu/, cuda/).
#include <Python.h>
#include <torch/library.h>

#include "attention.h"
#include "cpu/isa.h"

// `import fused_mtl_attn._C` loads the library and runs the registrations below; the module itself only reports
// the build and the CPU kernels' instruction set.
namespace {

PyObject* names_list(const std::vector<std::string>& names) {
  PyObject* list = PyList_New(0);
  for (const auto& n : names) {
    PyObject* s = PyUnicode_FromString(n.c_str());
    PyList_Append(list, s);
    Py_DECREF(s);
  }
  return list;
}

// runs f, turning a C++ exception into a Python one of type `type`
template <typename F>
PyObject* guarded(PyObject* type, F f) {
  try {
    return f();
  } catch (const c10::Error& e) {
    PyErr_SetString(type, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(type, e.what());
  }
  return nullptr;
}

PyObject* cpu_isa(PyObject*, PyObject*) {
  return guarded(PyExc_RuntimeError, [] { return PyUnicode_FromString(fused_mtl_attn::cpu::isa().c_str()); });
}

PyObject* compiled_cpu_isas(PyObject*, PyObject*) {
  return guarded(PyExc_RuntimeError, [] { return names_list(fused_mtl_attn::cpu::compiled_isas()); });
}

PyObject* supported_cpu_isas(PyObject*, PyObject*) {
  return guarded(PyExc_RuntimeError, [] { return names_list(fused_mtl_attn::cpu::supported_isas()); });
}

PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  if (!PyUnicode_Check(arg)) {
    PyErr_Format(PyExc_TypeError, "the instruction set must be a str, got %s", Py_TYPE(arg)->tp_name);
    return nullptr;
  }
  const std::string name = PyUnicode_AsUTF8(arg);
  return guarded(PyExc_ValueError, [&] {
    fused_mtl_attn::cpu::set_isa(name);
    Py_RETURN_NONE;
  });
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set of the CPU kernels in effect."},
    {"compiled_cpu_isas", compiled_cpu_isas, METH_NOARGS, "The instruction sets this build holds, best first."},
    {"supported_cpu_isas", supported_cpu_isas, METH_NOARGS, "Those the running CPU supports, best first."},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Switch the CPU kernels to another instruction set."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
#ifdef FMA_CPU_MARCH
  PyModule_AddIntConstant(module, "built_with_march", 1);  // FUSED_MTL_ATTN_CPU_ARCH: not a portable build
#else
  PyModule_AddIntConstant(module, "built_with_march", 0);
#endif
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
// Backward needs no `out`: every backend gets g . out from S and z (docs/attention-op.md, section 3).
TORCH_LIBRARY(fused_mtl_attn, m) {
  fused_mtl_attn::define_attention_ops(m);
  // the fused loss (cross_entropy.h): (sum over labelled pixels of lse - z_label, lse [B, H, W]); CPU kernels only
  m.def("upsampled_cross_entropy(Tensor logits, Tensor label, int ignore_index) -> (Tensor, Tensor)");
  m.def("upsampled_cross_entropy_backward(Tensor grad, Tensor logits, Tensor label, Tensor lse, int ignore_index) "
        "-> Tensor");
  // BatchNorm + ReLU (relu=False: BatchNorm alone) over a block of channels of h [B, C, N] (batch_norm_relu.h), the
  // fused aggregation head's and CTAM projections' elementwise part: (output, mean, biased var); batch statistics
  // when mean and var are None. CPU kernels only
  m.def("batch_norm_relu(Tensor h, Tensor weight, Tensor bias, Tensor? mean, Tensor? var, float eps, "
        "bool relu=True) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_relu_backward(Tensor grad, Tensor h, Tensor mean, Tensor var, Tensor weight, Tensor bias, "
        "float eps, bool batch_stats, bool relu=True) -> (Tensor, Tensor, Tensor, Tensor)");
  // Swin's window attention (window_attention.h): qkv [BW, L, 3*dim] -> (out [BW, L, dim], lse [BW, heads, L]);
  // backward -> (dL/dqkv, dL/dbias). CPU kernels only
  m.def("window_attention(Tensor qkv, Tensor bias, Tensor? mask, int heads, float scale) -> (Tensor, Tensor)");
  m.def("window_attention_backward(Tensor grad, Tensor qkv, Tensor bias, Tensor? mask, Tensor lse, int heads, "
        "float scale) -> (Tensor, Tensor)");
  // training-mode BatchNorm of x [B, C, ...] with channels innermost (batch_norm_channels_last.h): (y with x's
  // strides, batch mean, biased batch variance); backward -> (dL/dx, dL/dweight, dL/dbias). CPU kernels only
  m.def("batch_norm_channels_last(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_channels_last_backward(Tensor grad, Tensor x, Tensor mean, Tensor var, Tensor weight, "
        "float eps) -> (Tensor, Tensor, Tensor)");
  // out [P, H, W] += sum_k sources[k] [P, h_k, W] resampled along the rows by the 2-tap filters tap_index [H, 2]
  // (int64) and tap_weight [H, 2] (float64) (upsample_rows.h), the row pass of the fused aggregation head's
  // bilinear upsampling; backward -> dL/dsources. CPU kernels only
  m.def("upsample_rows_accumulate(Tensor(a!) out, Tensor[] sources, Tensor[] tap_index, Tensor[] tap_weight) "
        "-> ()");
  m.def("upsample_rows_accumulate_backward(Tensor grad, Tensor[] tap_index, Tensor[] tap_weight, "
        "int[] source_heights) -> Tensor[]");
}
