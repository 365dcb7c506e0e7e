// The Python module fastbert._C: importing it loads this library, whose static initialisers register the
// torch.ops.fastbert.* operators (ops.cpp). It has no Python-level functions of its own.
#include <Python.h>

static struct PyModuleDef fastbert_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                               "torch.ops.fastbert.* (registered on import)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastbert_c_module); }
