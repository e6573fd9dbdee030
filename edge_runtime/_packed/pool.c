/* 2 x 2 average pooling of NHWC float32 maps (stride 2, no padding, floor), the packed
 * backend's shortcut pools (edge_runtime.pool):
 *
 *     out[n, i, j, c] = ((((0 + a) + b) + d) + e) * 0.25
 *
 * a, b the top row of the window, d, e the bottom row: the float32 operations of MLAS's
 * blocked (NCHWc) pooling kernel, in its order (the build keeps -ffp-contract=off).  One pass:
 * each input row pair is read once, each output row written once; compiled per target, the
 * variant of the default kernel path runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "glue.h"

/* Output rows [i0, i1) of every item (rows counted over the batch), compiled per target: the
 * channel loop vectorises (the same float32 operations per element, in the same order). */
#define DEFINE_POOL(NAME, ATTR)                                                                \
    ATTR static void NAME(const float *restrict x, float *restrict o, Py_ssize_t h,            \
                          Py_ssize_t w, Py_ssize_t c, Py_ssize_t i0, Py_ssize_t i1)            \
    {                                                                                          \
        const Py_ssize_t ho = h / 2, wo = w / 2;                                               \
        for (Py_ssize_t r = i0; r < i1; r++) {                                                 \
            const Py_ssize_t b = r / ho, i = r % ho;                                           \
            const float *top = x + ((b * h + 2 * i) * w) * c, *bot = top + w * c;              \
            float *orow = o + r * wo * c;                                                      \
            for (Py_ssize_t j = 0; j < wo; j++) {                                              \
                const float *restrict t = top + 2 * j * c, *restrict u = bot + 2 * j * c;      \
                float *restrict dst = orow + j * c;                                            \
                for (Py_ssize_t k = 0; k < c; k++) {                                           \
                    float v = 0.0f + t[k];                                                     \
                    v = v + t[c + k];                                                          \
                    v = v + u[k];                                                              \
                    v = v + u[c + k];                                                          \
                    dst[k] = v * 0.25f;                                                        \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }

#if HIDIFF_X86 && defined(__GNUC__)
#include <string.h>
DEFINE_POOL(pool_avx512, __attribute__((target("avx512f"))))
DEFINE_POOL(pool_avx2, __attribute__((target("avx2"))))
#endif
DEFINE_POOL(pool_base, )

typedef void (*pool_fn)(const float *, float *, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                        Py_ssize_t);

typedef struct {
    pool_fn fn;
    const float *x;
    float *o;
    Py_ssize_t h, w, c;
} pool_job;

/* output rows [lo, hi) of the batch (run_parallel's range function) */
static void pool_range(void *ctx, Py_ssize_t lo, Py_ssize_t hi)
{
    const pool_job *j = ctx;
    j->fn(j->x, j->o, j->h, j->w, j->c, lo, hi);
}

/* The variant of the default kernel path (set_path). */
static pool_fn pick_pool(void)
{
#if HIDIFF_X86 && defined(__GNUC__)
    const char *path = default_path_name();
    if (strcmp(path, "avx512") == 0)
        return pool_avx512;
    if (strcmp(path, "avx2") == 0)
        return pool_avx2;
#endif
    return pool_base;
}

PyObject *py_avg_pool2(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *names[] = {"x", "out", "threads", NULL};
    PyObject *x_obj, *out_obj = Py_None;
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|Oi", names, &x_obj, &out_obj, &threads))
        return NULL;
    if (threads < 1) {
        PyErr_Format(PyExc_ValueError, "threads must be >= 1, got %d", threads);
        return NULL;
    }
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
    if (result && (const char *)ov.buf < (const char *)xv.buf + xv.len &&
        (const char *)xv.buf < (const char *)ov.buf + ov.len) { /* the kernel assumes apart */
        PyErr_SetString(PyExc_ValueError, "out must not overlap x");
        PyBuffer_Release(&ov);
        Py_CLEAR(result);
    }
    if (result) {
        const pool_job job = {pick_pool(), (const float *)xv.buf, (float *)ov.buf, h, w, c};
        /* output rows of at least ~32 K values per thread (parallel.c) */
        const Py_ssize_t grain = ((Py_ssize_t)1 << 15) / ((w / 2) * c + 1) + 1;
        Py_BEGIN_ALLOW_THREADS
        run_parallel(threads, n * (h / 2), 1, grain, pool_range, (void *)&job);
        Py_END_ALLOW_THREADS
        PyBuffer_Release(&ov);
    }
    PyBuffer_Release(&xv);
    return result;
}
