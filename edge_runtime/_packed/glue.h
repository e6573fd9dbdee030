/* Declarations shared by the Python glue files of edge_runtime._packed (packed.c, bconv.c,
 * chain.c, chain_py.c, pool.c, pointwise.c, shifted.c, parallel.c). */
#ifndef HIDIFF_PACKED_GLUE_H
#define HIDIFF_PACKED_GLUE_H

#include <Python.h>

#include "kernels.h"

extern path_desc PATHS[];

/* Path index for `name` (None: the current path); -1 with ValueError when unknown/unsupported. */
int resolve_path(PyObject *name);
/* Name of the default path (set_path); the native elementwise passes follow it. */
const char *default_path_name(void);
/* C-contiguous buffer of 4-byte items: kind 'f' float32, 'i' int32/uint32 words. */
int get_buffer(PyObject *obj, Py_buffer *v, const char *what, char kind, int writable);
/* `out` checked against shape, or a new numpy array; fills `view` (writable). New reference. */
PyObject *output(PyObject *out, Py_buffer *view, int ndim, const Py_ssize_t *shape, char kind);
/* Optional per-channel float32 vector: (c,) shared (*bstride 0) or (n, c) per batch item
 * (*bstride c); v->obj NULL when obj is None/NULL.  -1 with ValueError on a bad shape. */
int opt_channels(PyObject *obj, Py_buffer *v, const char *what, Py_ssize_t n, Py_ssize_t c,
                 int *bstride);

/* fn(ctx, lo, hi) over [0, n) split into `threads` chunks of multiples of `align` (parallel.c);
 * one thread when a chunk would be shorter than `grain`.  Call without the GIL. */
typedef void (*range_fn)(void *ctx, Py_ssize_t lo, Py_ssize_t hi);
void run_parallel(int threads, Py_ssize_t n, Py_ssize_t align, Py_ssize_t grain, range_fn fn,
                  void *ctx);

PyObject *py_prepare(PyObject *self, PyObject *args, PyObject *kw);
PyObject *py_prepared_info(PyObject *self, PyObject *cap);
PyObject *py_bconv2d(PyObject *self, PyObject *args, PyObject *kw);
PyObject *py_ew_chain(PyObject *self, PyObject *args, PyObject *kw);
PyObject *py_avg_pool2(PyObject *self, PyObject *args, PyObject *kw);
PyObject *py_pointwise(PyObject *self, PyObject *args, PyObject *kw);
PyObject *py_shifted_sum(PyObject *self, PyObject *args, PyObject *kw);

#define BCONV2D_DOC                                                                              \
    "bconv2d(x, w, cin, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, pad_value,\n"    \
    "        scale=None, bias=None, thresholds=None, out=None, path=None, threads=1, *,\n"         \
    "        residual=None, zeta=None, slope=None, gamma=None, pack_sub=None, packed_out=None)\n\n"\
    "Binary conv of packed NHWC x (N, H, W, ceil(cin/32)) with packed OHWI w\n"                  \
    "(Cout, kh, kw, ceil(cin/32)) int32/uint32 words, or weights from prepare().\n"             \
    "yint = (#taps counted * cin) - 2 * popcount(x XOR w); pad_value 1 counts all kh*kw\n"       \
    "taps (the padding is +1), pad_value 0 only the non-padded ones.  Returns float32\n"         \
    "(N, Ho, Wo, Cout) y = yint * scale + bias, or with thresholds (Cout,) float32 packed\n"      \
    "int32 (N, Ho, Wo, ceil(Cout/32)) words of sign(y - thr) (bit 1 where y < thr).\n"        \
    "Float output only: the fused epilogue y = y + residual (NHWC like out, or out itself),\n"  \
    "+ zeta, y < 0 ? y * slope : y, + gamma (float32, this order; vectors (Cout,) or\n"         \
    "(N, Cout), slope (Cout,)); with pack_sub also the words of y - pack_sub: returns\n"        \
    "(out, words)."

#endif
