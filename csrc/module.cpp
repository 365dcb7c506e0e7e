// The Python module fastbert._C: importing it loads this library, whose static initialisers register the
// torch.ops.fastbert.* operators (ops.cpp). Its one Python-level attribute, BUILD_TORCH_VERSION, is the
// torch.__version__ it was compiled against (written by setup.py into fastbert_build_info.h).
#include <Python.h>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

#if __has_include("fastbert_build_info.h")
#include "fastbert_build_info.h"
static_assert(FASTBERT_BUILD_TORCH_MAJOR == TORCH_VERSION_MAJOR &&
                  FASTBERT_BUILD_TORCH_MINOR == TORCH_VERSION_MINOR,
              "setup.py's torch and the torch headers being compiled against are different releases");
#else
// Built without setup.py (e.g. torch.utils.cpp_extension.load): the headers' version, without a local label.
#define FASTBERT_BUILD_TORCH_VERSION TORCH_VERSION
#endif

// The same version as a marker in the library's read-only data, so fastbert/_cpp.py can read it from the file
// when the library cannot be loaded (built against another torch: undefined symbols) and name the mismatch.
extern "C" __attribute__((used, visibility("default"))) const char fastbert_build_torch_marker[] =
    "fastbert-build-torch=" FASTBERT_BUILD_TORCH_VERSION;

static struct PyModuleDef fastbert_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                               "torch.ops.fastbert.* (registered on import)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastbert_c_module);
  if (module != nullptr &&
      PyModule_AddStringConstant(module, "BUILD_TORCH_VERSION", FASTBERT_BUILD_TORCH_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
