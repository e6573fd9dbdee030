/* edge_runtime._packed: packed XNOR-popcount binary convolution for CPU (CPython extension).
 *
 * Plain C API + buffer protocol (no NumPy headers needed at build time); output arrays are made
 * with numpy.empty at run time.  Three kernel paths are compiled into the same module and chosen
 * at import by CPU features: "avx512" (AVX-512F/BW + VPOPCNTDQ), "avx2", "portable".  See
 * kernels.h for the packed format and the arithmetic; edge_runtime/packed.py for the Python API.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>

#include "glue.h"

path_desc PATHS[] = {
#if HIDIFF_X86
    {"avx512", row_avx512, pack_avx512, pack_nchw_avx512, NULL, 16, LAYOUT_WORDS, 0, 1},
    {"avx2", row_avx2, pack_avx2, pack_nchw_avx2, NULL, 8, LAYOUT_WORDS, 0, 1},
#endif
    {"portable", row_portable, pack_portable, pack_nchw_portable, epilogue_portable, 16,
     LAYOUT_LUT, 1, 0},
};
#define NPATHS ((int)(sizeof PATHS / sizeof PATHS[0]))
static int current_path = NPATHS - 1;
static PyObject *np_empty = NULL;

static void detect_paths(void)
{
#if HIDIFF_X86 && defined(__GNUC__)
    __builtin_cpu_init();
    PATHS[0].supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                         && __builtin_cpu_supports("avx512vpopcntdq");
    PATHS[1].supported = __builtin_cpu_supports("avx2");
#endif
    for (int i = 0; i < NPATHS; i++)
        if (PATHS[i].supported) {
            current_path = i;
            break;
        }
}

static PyObject *available_list(void)
{
    PyObject *t = PyList_New(0);
    for (int i = 0; t && i < NPATHS; i++)
        if (PATHS[i].supported) {
            PyObject *s = PyUnicode_FromString(PATHS[i].name);
            if (!s || PyList_Append(t, s) < 0) {
                Py_XDECREF(s);
                Py_CLEAR(t);
                break;
            }
            Py_DECREF(s);
        }
    return t;
}

/* Name of the default path ("avx512", "avx2" or "portable"): the native elementwise passes
 * (chain.c, pointwise.c) take the same instruction set as the binary kernels. */
const char *default_path_name(void)
{
    return PATHS[current_path].name;
}

/* Path index for `name` (None: the current path); -1 with ValueError when unknown/unsupported. */
int resolve_path(PyObject *name)
{
    if (name == NULL || name == Py_None)
        return current_path;
    const char *s = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : NULL;
    for (int i = 0; s && i < NPATHS; i++)
        if (strcmp(s, PATHS[i].name) == 0 && PATHS[i].supported)
            return i;
    PyErr_Clear();
    PyObject *allowed = available_list();
    if (allowed) {
        PyErr_Format(PyExc_ValueError,
                     "unknown or unsupported kernel path %R on this CPU; allowed values: %R", name,
                     allowed);
        Py_DECREF(allowed);
    }
    return -1;
}

/* ---- buffers ---------------------------------------------------------------------------- */

int get_buffer(PyObject *obj, Py_buffer *v, const char *what, char kind, int writable)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, v, flags) < 0) {
        if (PyErr_ExceptionMatches(PyExc_BufferError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous%s array", what,
                         writable ? ", writable" : "");
        }
        return -1;
    }
    const char *f = v->format ? v->format : "B";
    while (*f == '@' || *f == '=' || *f == '<')
        f++;
    int ok = v->itemsize == 4 && f[0] && !f[1];
    if (ok && kind == 'f')
        ok = f[0] == 'f';
    else if (ok)
        ok = f[0] == 'i' || f[0] == 'I' || f[0] == 'l' || f[0] == 'L';
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "%s must hold %s (got buffer format '%s')", what,
                     kind == 'f' ? "float32" : "32-bit packed words (int32/uint32)", v->format);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

/* numpy.empty(shape, dtype) for a shape given as C array. */
static PyObject *new_array(int ndim, const Py_ssize_t *shape, const char *dtype)
{
    if (!np_empty) {
        PyObject *np = PyImport_ImportModule("numpy");
        if (!np)
            return NULL;
        np_empty = PyObject_GetAttrString(np, "empty");
        Py_DECREF(np);
        if (!np_empty)
            return NULL;
    }
    PyObject *tup = PyTuple_New(ndim);
    if (!tup)
        return NULL;
    for (int i = 0; i < ndim; i++) {
        PyObject *dim = PyLong_FromSsize_t(shape[i]);
        if (!dim) {
            Py_DECREF(tup);
            return NULL;
        }
        PyTuple_SET_ITEM(tup, i, dim);
    }
    PyObject *res = PyObject_CallFunction(np_empty, "Os", tup, dtype);
    Py_DECREF(tup);
    return res;
}

/* Use `out` (checked against shape) or allocate; fills `view` (writable). New reference. */
PyObject *output(PyObject *out, Py_buffer *view, int ndim, const Py_ssize_t *shape,
                        char kind)
{
    PyObject *arr;
    if (out == NULL || out == Py_None) {
        arr = new_array(ndim, shape, kind == 'f' ? "float32" : "int32");
        if (!arr)
            return NULL;
    } else {
        arr = out;
        Py_INCREF(arr);
    }
    if (get_buffer(arr, view, "out", kind, 1) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    int ok = view->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++)
        ok = view->shape[i] == shape[i];
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "out has the wrong shape for this call");
        PyBuffer_Release(view);
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

/* ---- pack ------------------------------------------------------------------------------- */

/* Optional per-channel vector `sub` of a pack / epilogue: shape (c,) shared, or (n, c) per batch
 * item.  Sets *bstride to 0 or c; v->obj is NULL when absent. */
int opt_channels(PyObject *obj, Py_buffer *v, const char *what, Py_ssize_t n, Py_ssize_t c,
                 int *bstride)
{
    v->obj = NULL;
    v->buf = NULL;
    *bstride = 0;
    if (obj == NULL || obj == Py_None)
        return 0;
    if (get_buffer(obj, v, what, 'f', 0) < 0)
        return -1;
    if (v->ndim == 1 && v->shape[0] == c)
        return 0;
    if (v->ndim == 2 && v->shape[0] == n && v->shape[1] == c) {
        *bstride = (int)c;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "%s must have shape (%zd,) or (%zd, %zd)", what, c, n, c);
    PyBuffer_Release(v);
    v->obj = NULL;
    return -1;
}

static PyObject *py_pack(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"x", "out", "path", "sub", NULL};
    PyObject *x_obj, *out_obj = NULL, *path_obj = NULL, *sub_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OOO:pack", kwlist, &x_obj, &out_obj,
                                     &path_obj, &sub_obj))
        return NULL;
    int pi = resolve_path(path_obj);
    if (pi < 0)
        return NULL;
    Py_buffer xv, ov, sv;
    if (get_buffer(x_obj, &xv, "x", 'f', 0) < 0)
        return NULL;
    if (xv.ndim < 1 || xv.ndim > 64) {
        PyBuffer_Release(&xv);
        PyErr_SetString(PyExc_ValueError, "x needs 1 to 64 axes (the last one is packed)");
        return NULL;
    }
    Py_ssize_t shape[64];
    size_t rows = 1;
    for (int i = 0; i < xv.ndim - 1; i++)
        rows *= (size_t)(shape[i] = xv.shape[i]);
    const Py_ssize_t c = xv.shape[xv.ndim - 1];
    const Py_ssize_t nb = xv.ndim >= 2 ? xv.shape[0] : 1;
    int bstride;
    if (opt_channels(sub_obj, &sv, "sub", nb, c, &bstride) < 0) {
        PyBuffer_Release(&xv);
        return NULL;
    }
    shape[xv.ndim - 1] = (c + 31) / 32;
    PyObject *res = output(out_obj, &ov, xv.ndim, shape, 'i');
    if (res) {
        Py_BEGIN_ALLOW_THREADS
        if (c > 0 && rows > 0) {
            const size_t per = bstride ? rows / (size_t)nb : rows;
            const size_t wd = (size_t)((c + 31) / 32);
            for (size_t b = 0; b < rows / per; b++)
                PATHS[pi].pack((const float *)xv.buf + b * per * (size_t)c,
                               (uint32_t *)ov.buf + b * per * wd, per, (int)c,
                               sv.obj ? (const float *)sv.buf + b * (size_t)bstride : NULL);
        }
        Py_END_ALLOW_THREADS
        PyBuffer_Release(&ov);
    }
    if (sv.obj)
        PyBuffer_Release(&sv);
    PyBuffer_Release(&xv);
    return res;
}

static PyObject *py_pack_nchw(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"x", "out", "path", NULL};
    PyObject *x_obj, *out_obj = NULL, *path_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OO:pack_nchw", kwlist, &x_obj, &out_obj,
                                     &path_obj))
        return NULL;
    int pi = resolve_path(path_obj);
    if (pi < 0)
        return NULL;
    Py_buffer xv, ov;
    if (get_buffer(x_obj, &xv, "x", 'f', 0) < 0)
        return NULL;
    if (xv.ndim != 4) {
        PyBuffer_Release(&xv);
        PyErr_SetString(PyExc_ValueError, "x must be NCHW (4 axes)");
        return NULL;
    }
    const Py_ssize_t *s = xv.shape;
    const Py_ssize_t shape[4] = {s[0], s[2], s[3], (s[1] + 31) / 32};
    PyObject *res = output(out_obj, &ov, 4, shape, 'i');
    if (res) {
        Py_BEGIN_ALLOW_THREADS
        if (s[1] > 0)
            PATHS[pi].pack_nchw((const float *)xv.buf, (uint32_t *)ov.buf, (size_t)s[0],
                                (int)s[1], (size_t)(s[2] * s[3]));
        Py_END_ALLOW_THREADS
        PyBuffer_Release(&ov);
    }
    PyBuffer_Release(&xv);
    return res;
}

static PyObject *py_available_paths(PyObject *self, PyObject *unused)
{
    PyObject *l = available_list();
    if (!l)
        return NULL;
    PyObject *t = PyList_AsTuple(l);
    Py_DECREF(l);
    return t;
}

static PyObject *py_current_path(PyObject *self, PyObject *unused)
{
    return PyUnicode_FromString(PATHS[current_path].name);
}

static PyObject *py_set_path(PyObject *self, PyObject *name)
{
    if (name == Py_None) {
        detect_paths();
        Py_RETURN_NONE;
    }
    const int pi = resolve_path(name);
    if (pi < 0)
        return NULL;
    current_path = pi;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"pack", (PyCFunction)(void (*)(void))py_pack, METH_VARARGS | METH_KEYWORDS,
     "pack(x, out=None, path=None, sub=None) -> int32 words: sign bits of float32 x along the "
     "last axis (bit 1 where x < 0, LSB first, 32 per word, unused bits 0); with sub (C,) or "
     "(N, C) float32 the bits of the float32 difference x - sub (per batch item for (N, C))."},
    {"pack_nchw", (PyCFunction)(void (*)(void))py_pack_nchw, METH_VARARGS | METH_KEYWORDS,
     "pack_nchw(x, out=None, path=None) -> int32 (N, H, W, ceil(C/32)) words from float32 NCHW x."},
    {"bconv2d", (PyCFunction)(void (*)(void))py_bconv2d, METH_VARARGS | METH_KEYWORDS,
     BCONV2D_DOC},
    {"ew_chain", (PyCFunction)(void (*)(void))py_ew_chain, METH_VARARGS | METH_KEYWORDS,
     "ew_chain(x, ops, operands, out=None, table=None, kernel=None, upsample=False, threads=1, "
     "pack_sub=None, words=None, sub=None) -> float32: "
     "v = x (upsample: x NHWC repeated 2 x 2), then per "
     "op (bytes: a add, s v - o, r o - v, m mul, p PReLU) v = op(v, o) with o from operands (a "
     "full array like the result, one batch item of it, (C,), (N, C) or one value), each one "
     "float32 operation; out may be x or a full operand.  With table (2^(kh*kw), C) and kernel "
     "(kh, kw, pad_h, pad_w), x is a 0/1 map (N, H, W) and v starts as its stride-1 zero-padded "
     "convolution through the table (row = the pattern of taps, bit dy * kw + dx); None when x "
     "holds anything but +0.0 and 1.0.  sub=(table2, ops2, operands2) (with a table): u = the "
     "same rows of table2, then ops2; u is the operand o of the ops whose operand is None."},
    {"avg_pool2", (PyCFunction)(void (*)(void))py_avg_pool2, METH_VARARGS | METH_KEYWORDS,
     "avg_pool2(x, out=None, threads=1) -> float32 (N, H // 2, W // 2, C): 2 x 2 average pool "
     "of NHWC x (stride 2, floor), ((((0 + a) + b) + d) + e) * 0.25 over the window in "
     "row-major order; output rows split over `threads` threads."},
    {"shifted_sum", (PyCFunction)(void (*)(void))py_shifted_sum, METH_VARARGS | METH_KEYWORDS,
     "shifted_sum(x, terms, consts, top, left, ho, wo, out=None, threads=1) -> float32 (N, ho, "
     "wo, 1): per output pixel the float32 sum, left to right, of the terms (K, 3) int32 rows "
     "(channel, dy, dx): x[n, i + dy - top, j + dx - left, channel] of NHWC x, +0.0 outside it; "
     "a row with channel -1 adds consts[k] instead."},
    {"pointwise", (PyCFunction)(void (*)(void))py_pointwise, METH_VARARGS | METH_KEYWORDS,
     "pointwise(x, w, bias=None, out=None, threads=1, add_up=None) -> float32 (N, H, W, Cout): "
     "1 x 1 convolution of NHWC x with w (Cin, Cout): per output, fma over the input channels in "
     "order from 0, then + bias; with add_up (N, H / 2, W / 2, Cout) then add_up[n, i / 2, j / 2] "
     "+ y (a 2x nearest upsampling added in the same pass); with pack_sub ((Cout,) or (N, Cout)) "
     "and words (None or an int32 (N, H, W, ceil(Cout / 32)) array) returns (y, words), the "
     "packed sign words of y - pack_sub (bit set where it is < 0)."},
    {"prepare", (PyCFunction)(void (*)(void))py_prepare, METH_VARARGS | METH_KEYWORDS,
     "prepare(w, cin, kh, kw, path=None) -> opaque prepared weights for bconv2d (packed OHWI w "
     "in the layout of the kernel path; reuse them across calls)."},
    {"prepared_info", py_prepared_info, METH_O,
     "prepared_info(prepared) -> dict(path, cout, cin, kh, kw)."},
    {"available_paths", py_available_paths, METH_NOARGS,
     "available_paths() -> tuple of the kernel paths this CPU runs, fastest first."},
    {"current_path", py_current_path, METH_NOARGS, "current_path() -> the default kernel path."},
    {"set_path", py_set_path, METH_O,
     "set_path(name) -> set the default kernel path (None: the fastest available)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_packed",
    "Packed XNOR-popcount binary convolution kernels (see edge_runtime.packed).", -1, methods,
};

PyMODINIT_FUNC PyInit__packed(void)
{
    detect_paths();
    PyObject *m = PyModule_Create(&moduledef);
    if (m && PyModule_AddIntConstant(m, "WORD_BITS", 32) < 0)
        Py_CLEAR(m);
    return m;
}
