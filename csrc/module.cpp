// The Python module object of ami_dist._C. The ops register themselves with the dispatcher
// (TORCH_LIBRARY) when the shared library is loaded, so importing this empty module is all that
// Python needs to do; no pybind11 bindings are involved.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      .m_base = PyModuleDef_HEAD_INIT,
      .m_name = "_C",
      .m_doc = "Dispatcher registrations of the ami_dist LNS ops (torch.ops.ami_dist).",
      .m_size = -1,
      .m_methods = nullptr,
      .m_slots = nullptr,
      .m_traverse = nullptr,
      .m_clear = nullptr,
      .m_free = nullptr,
  };
  return PyModule_Create(&module_def);
}
