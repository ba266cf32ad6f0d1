// sam_kernels._identity: identity checks over Python containers, for the step plans' per-step
// checks (python_api/_plans.py, python_api/_step_plan.py; the Python API and its pure-Python
// twin are sam_kernels/identity.py).
//
// A planned step checks, before each half, that the optimizer's state still holds the objects
// the plan was built on: about 800 pointer compares over ResNet-50's 161 parameters. As Python
// (all(map(operator.is_, ...))) that was ~35 us of a ~0.19 ms step; here it is a C loop. This is
// a plain CPython module, apart from the op library (sam_kernels/_C*.so): importing it registers
// no op and needs no torch, so it loads wherever it was built.
//
// Each function returns True/False, or None where an argument is not of the exact kind it reads
// (then the caller runs the Python version, which defines the result).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstring>

namespace {

// same_values(mapping, held): mapping is a dict (or torch's state, a defaultdict) whose values
// are exactly the objects of the list `held`, in order.
// A dict, or collections.defaultdict (torch's optimizer state), whose iteration is the dict's
// own: a subclass may order its values otherwise (OrderedDict.move_to_end), so any other
// mapping is left to the Python version.
bool plain_dict(PyObject* m) {
  if (PyDict_CheckExact(m)) return true;
  return PyDict_Check(m) && std::strcmp(Py_TYPE(m)->tp_name, "collections.defaultdict") == 0;
}

PyObject* same_values(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !plain_dict(args[0]) || !PyList_CheckExact(args[1])) Py_RETURN_NONE;
  PyObject* mapping = args[0];
  PyObject* held = args[1];
  const Py_ssize_t n = PyList_GET_SIZE(held);
  if (PyDict_GET_SIZE(mapping) != n) Py_RETURN_FALSE;
  Py_ssize_t pos = 0, i = 0;
  PyObject *key, *value;
  while (PyDict_Next(mapping, &pos, &key, &value)) {
    if (i >= n || value != PyList_GET_ITEM(held, i)) Py_RETURN_FALSE;
    ++i;
  }
  return PyBool_FromLong(i == n);
}

// same_entries(dicts, keys, values): dicts[i].get(key_i) is values[i] for every i, where key_i
// is keys[i] (a list) or keys itself (a str: one key for all). A missing key reads as None, as
// dict.get does.
PyObject* same_entries(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3 || !PyList_CheckExact(args[0]) || !PyList_CheckExact(args[2])) Py_RETURN_NONE;
  PyObject* dicts = args[0];
  PyObject* keys = args[1];
  PyObject* values = args[2];
  // as the Python version: a str is one key for all, a list one key per dict (anything else:
  // the Python version reads it)
  const bool one_key = PyUnicode_Check(keys);
  if (!one_key && !PyList_CheckExact(keys)) Py_RETURN_NONE;
  const Py_ssize_t n = PyList_GET_SIZE(dicts);
  if (PyList_GET_SIZE(values) != n || (!one_key && PyList_GET_SIZE(keys) != n)) Py_RETURN_NONE;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* d = PyList_GET_ITEM(dicts, i);
    if (!PyDict_Check(d)) Py_RETURN_NONE;
    PyObject* k = one_key ? keys : PyList_GET_ITEM(keys, i);
    PyObject* v = PyDict_GetItemWithError(d, k);  // borrowed; NULL: missing (or an error)
    if (v == nullptr) {
      if (PyErr_Occurred()) return nullptr;  // an unhashable key: the error propagates
      v = Py_None;
    }
    if (v != PyList_GET_ITEM(values, i)) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

// same_group_params(groups, watch): the "params" lists of the dicts in `groups`, one after
// another, are exactly the objects of `watch`, in order (the same count).
PyObject* same_group_params(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyList_CheckExact(args[0]) || !PyList_CheckExact(args[1])) Py_RETURN_NONE;
  PyObject* groups = args[0];
  PyObject* watch = args[1];
  static PyObject* params_key = PyUnicode_InternFromString("params");
  if (params_key == nullptr) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(watch);
  Py_ssize_t at = 0;
  for (Py_ssize_t g = 0; g < PyList_GET_SIZE(groups); ++g) {
    PyObject* group = PyList_GET_ITEM(groups, g);
    if (!PyDict_Check(group)) Py_RETURN_NONE;
    PyObject* ps = PyDict_GetItemWithError(group, params_key);
    if (ps == nullptr) {
      if (PyErr_Occurred()) return nullptr;
      Py_RETURN_NONE;
    }
    if (!PyList_CheckExact(ps)) Py_RETURN_NONE;
    const Py_ssize_t m = PyList_GET_SIZE(ps);
    if (at + m > n) Py_RETURN_FALSE;
    for (Py_ssize_t j = 0; j < m; ++j, ++at) {
      if (PyList_GET_ITEM(ps, j) != PyList_GET_ITEM(watch, at)) Py_RETURN_FALSE;
    }
  }
  return PyBool_FromLong(at == n);
}

PyMethodDef methods[] = {
    {"same_values", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(same_values)),
     METH_FASTCALL, "same_values(mapping, held) -> bool | None"},
    {"same_entries", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(same_entries)),
     METH_FASTCALL, "same_entries(dicts, keys, values) -> bool | None"},
    {"same_group_params",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(same_group_params)),
     METH_FASTCALL, "same_group_params(groups, watch) -> bool | None"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_identity", "Identity checks of the step plans (sam_kernels/identity.py).",
    -1, methods, nullptr, nullptr, nullptr, nullptr,
};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__identity(void) { return PyModule_Create(&module); }
