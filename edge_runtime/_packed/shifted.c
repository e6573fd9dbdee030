/* Sum of shifted windows of an NHWC map (the refiner head's k x k convolution to few channels,
 * rewritten by edge_runtime.rewrite.narrow_conv into a 1 x 1 convolution to one channel per tap,
 * a zero Pad, one Slice per tap and a Sum).
 *
 * For every output pixel (i, j) of item b, with the terms in the Sum's input order:
 *
 *     v = term_0;  v = v + term_1;  ...  v = v + term_{K-1}          (float32, left to right)
 *
 * where a tap term (channel c, offset dy, dx) is x[b, i + dy - top, j + dx - left, c] inside the
 * map and +0.0 in its zero padding (added like any value: -0.0 + 0.0 gives +0.0, as the padded
 * map does), and a constant term is its value.  edge_runtime.shifted checks this order against
 * onnxruntime's Pad / Slice / Sum when a model loads. */
#include "glue.h"

typedef struct {
    const float *x;
    float *out;
    Py_ssize_t h, w, c, ho, wo;
    int top, left, nterms;
    const int32_t *terms; /* [nterms][3]: channel (-1: constant), dy, dx */
    const float *consts;  /* [nterms]: the constant terms' values */
} shift_job;

/* o[col] = first ? v : o[col] + v over columns [c0, c1) */
#define ACC(c0, c1, V)                                                                         \
    do {                                                                                       \
        if (first)                                                                             \
            for (Py_ssize_t col = (c0); col < (c1); col++)                                     \
                o[col] = (V);                                                                  \
        else                                                                                   \
            for (Py_ssize_t col = (c0); col < (c1); col++)                                     \
                o[col] = o[col] + (V);                                                         \
    } while (0)

/* Output rows [lo, hi) of all items (row index b * ho + i), term by term: each pixel still
 * adds its terms in order, and a row of the output stays in L1 across the terms. */
static void shift_range(void *ctx, Py_ssize_t lo, Py_ssize_t hi)
{
    const shift_job *j = ctx;
    const Py_ssize_t c = j->c;
    for (Py_ssize_t row = lo; row < hi; row++) {
        const Py_ssize_t b = row / j->ho, i = row % j->ho;
        float *o = j->out + row * j->wo;
        for (int k = 0; k < j->nterms; k++) {
            const int32_t *t = j->terms + 3 * k;
            const int first = k == 0;
            if (t[0] < 0) {
                const float v = j->consts[k];
                ACC(0, j->wo, v);
                continue;
            }
            const Py_ssize_t r = i + t[1] - j->top, shift = t[2] - j->left;
            if (r < 0 || r >= j->h) {
                ACC(0, j->wo, 0.0f);
                continue;
            }
            /* columns whose source q = col + shift lies in [0, w) */
            Py_ssize_t c0 = shift < 0 ? -shift : 0, c1 = j->w - shift;
            c0 = c0 > j->wo ? j->wo : c0;
            c1 = c1 < c0 ? c0 : c1 > j->wo ? j->wo : c1;
            const float *src = j->x + ((b * j->h + r) * j->w + shift) * c + t[0];
            ACC(0, c0, 0.0f);
            ACC(c0, c1, src[col * c]);
            ACC(c1, j->wo, 0.0f);
        }
    }
}

PyObject *py_shifted_sum(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *names[] = {"x", "terms", "consts", "top", "left", "ho", "wo", "out", "threads",
                            NULL};
    PyObject *x_obj, *t_obj, *c_obj, *out_obj = Py_None;
    int top, left, threads = 1;
    Py_ssize_t ho, wo;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOiinn|Oi", names, &x_obj, &t_obj, &c_obj, &top,
                                     &left, &ho, &wo, &out_obj, &threads))
        return NULL;
    Py_buffer xv, tv, cv, ov;
    PyObject *result = NULL;
    if (get_buffer(x_obj, &xv, "x", 'f', 0) < 0)
        return NULL;
    if (get_buffer(t_obj, &tv, "terms", 'i', 0) < 0) {
        PyBuffer_Release(&xv);
        return NULL;
    }
    if (get_buffer(c_obj, &cv, "consts", 'f', 0) < 0) {
        PyBuffer_Release(&tv);
        PyBuffer_Release(&xv);
        return NULL;
    }
    const Py_ssize_t nterms = tv.ndim == 2 ? tv.shape[0] : 0;
    if (xv.ndim != 4 || tv.ndim != 2 || tv.shape[1] != 3 || nterms < 1 || cv.ndim != 1 ||
        cv.shape[0] != nterms || ho < 0 || wo < 0) {
        PyErr_SetString(PyExc_ValueError, "x must be NHWC, terms (K, 3) int32 with K >= 1, "
                                          "consts (K,) float32, ho and wo >= 0");
        goto done;
    }
    const int32_t *t = tv.buf;
    for (Py_ssize_t k = 0; k < nterms; k++)
        if (t[3 * k] >= xv.shape[3]) {
            PyErr_SetString(PyExc_ValueError, "a term's channel is outside x");
            goto done;
        }
    const Py_ssize_t shape[4] = {xv.shape[0], ho, wo, 1};
    result = output(out_obj, &ov, 4, shape, 'f');
    if (!result)
        goto done;
    {
        const shift_job job = {xv.buf, ov.buf, xv.shape[1], xv.shape[2], xv.shape[3], ho, wo,
                               top, left, (int)nterms, t, cv.buf};
        Py_BEGIN_ALLOW_THREADS
        /* rows of at least ~64 K terms per thread (parallel.c) */
        const Py_ssize_t grain = ((Py_ssize_t)1 << 16) / (wo * nterms + 1) + 1;
        run_parallel(threads, shape[0] * ho, 1, grain, shift_range, (void *)&job);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&ov);
done:
    PyBuffer_Release(&cv);
    PyBuffer_Release(&tv);
    PyBuffer_Release(&xv);
    return result;
}
