/* An empty Python module of the kernels' shared library: it is loaded with ctypes
 * (`diffcodec/native.py`), never imported; PyInit_ only keeps every platform's build tools
 * content. */
#include <Python.h>

#define DC_CONCAT(a, b) a##b
#define DC_INIT(name) DC_CONCAT(PyInit_, name)

static struct PyModuleDef dc_module = {PyModuleDef_HEAD_INIT, "diffcodec native kernels", NULL, -1, NULL};

PyMODINIT_FUNC DC_INIT(DC_MODULE)(void) { return PyModule_Create(&dc_module); }

/* 4: the CPU runs AVX-512 (F, BW, DQ, VL, CD) code, 3: AVX2 code (with FMA, BMI1/2, F16C),
 * 1: neither or not x86 (what the loader may pick; `native.py`). */
__attribute__((visibility("default"))) int dc_cpu_level(void) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    int v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi")
             && __builtin_cpu_supports("bmi2");
    int v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
             && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")
             && __builtin_cpu_supports("avx512cd");
    return v4 ? 4 : v3 ? 3 : 1;
#else
    return 1;
#endif
}
