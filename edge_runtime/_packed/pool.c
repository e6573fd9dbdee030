/* 2 x 2 average pooling of NHWC float32 maps (stride 2, no padding, floor), the packed
 * backend's shortcut pools (edge_runtime.pool):
 *
 *     out[n, i, j, c] = ((((0 + a) + b) + d) + e) * 0.25
 *
 * a, b the top row of the window, d, e the bottom row: the float32 operations of MLAS's
 * blocked (NCHWc) pooling kernel, in its order (the build keeps -ffp-contract=off).  One pass:
 * each input row pair is read once, each output row written once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "glue.h"

PyObject *py_avg_pool2(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *names[] = {"x", "out", NULL};
    PyObject *x_obj, *out_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O", names, &x_obj, &out_obj))
        return NULL;
    Py_buffer xv, ov;
    if (get_buffer(x_obj, &xv, "x", 'f', 0) < 0)
        return NULL;
    if (xv.ndim != 4 || xv.shape[1] < 2 || xv.shape[2] < 2) {
        PyErr_SetString(PyExc_ValueError, "x must be NHWC (N, H, W, C) with H, W >= 2");
        PyBuffer_Release(&xv);
        return NULL;
    }
    const Py_ssize_t n = xv.shape[0], h = xv.shape[1], w = xv.shape[2], c = xv.shape[3];
    const Py_ssize_t shape[4] = {n, h / 2, w / 2, c};
    PyObject *result = output(out_obj, &ov, 4, shape, 'f');
    if (result) {
        const float *x = (const float *)xv.buf;
        float *o = (float *)ov.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t b = 0; b < n; b++)
            for (Py_ssize_t i = 0; i < h / 2; i++) {
                const float *top = x + ((b * h + 2 * i) * w) * c, *bot = top + w * c;
                float *orow = o + ((b * (h / 2) + i) * (w / 2)) * c;
                for (Py_ssize_t j = 0; j < w / 2; j++) {
                    const float *t = top + 2 * j * c, *u = bot + 2 * j * c;
                    float *dst = orow + j * c;
                    for (Py_ssize_t k = 0; k < c; k++) {
                        float v = 0.0f + t[k];
                        v = v + t[c + k];
                        v = v + u[k];
                        v = v + u[c + k];
                        dst[k] = v * 0.25f;
                    }
                }
            }
        Py_END_ALLOW_THREADS
        PyBuffer_Release(&ov);
    }
    PyBuffer_Release(&xv);
    return result;
}
