/* ew_chain: the Python glue of the elementwise chains (chain.c): arguments, the start's row
 * indices (a table lookup of the 0/1 state y_t, or a 2x nearest upsampling), the optional second
 * lookup chain (sub) and the optional packed output. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>

#include "chain.h"

/* out[q] |= src[q] << bit (a function of its own: then it vectorises) */
static __attribute__((noinline)) void or_shifted(uint32_t *restrict out,
                                                 const uint8_t *restrict src, Py_ssize_t n,
                                                 uint32_t bit)
{
    for (Py_ssize_t q = 0; q < n; q++)
        out[q] |= (uint32_t)src[q] << bit;
}

/* Table rows of every output pixel of the 0/1 map y (n, h, w); 0 when y holds anything but
 * +0.0 and 1.0.  plane: (h + 2 ph) * (w + 2 pw) bytes of scratch (one item's map, padded with
 * zeros, 1 where y is 1); loops without early exits, so that they vectorise. */
static int lut_rows(const float *y, Py_ssize_t n, Py_ssize_t h, Py_ssize_t w, int kh, int kw,
                    int ph, int pw, Py_ssize_t ho, Py_ssize_t wo, uint32_t *restrict idx,
                    uint8_t *restrict plane)
{
    uint32_t bad = 0;
    for (Py_ssize_t i = 0; i < n * h * w; i++) {
        uint32_t bits;
        memcpy(&bits, y + i, 4);
        bad |= (uint32_t)(bits != 0u) & (uint32_t)(bits != 0x3F800000u);
    }
    if (bad)
        return 0;
    const Py_ssize_t wp = w + 2 * pw, hp = h + 2 * ph;
    memset(plane, 0, (size_t)(hp * wp));
    for (Py_ssize_t b = 0; b < n; b++) {
        for (Py_ssize_t r = 0; r < h; r++) {
            const float *row = y + (b * h + r) * w;
            uint8_t *dst = plane + (r + ph) * wp + pw;
            for (Py_ssize_t x = 0; x < w; x++)
                dst[x] = (uint8_t)(row[x] != 0.0f);
        }
        for (Py_ssize_t r = 0; r < ho; r++) {
            uint32_t *restrict out = idx + (b * ho + r) * wo;
            memset(out, 0, sizeof(uint32_t) * (size_t)wo);
            for (int dy = 0; dy < kh; dy++)
                for (int dx = 0; dx < kw; dx++) { /* bit dy * kw + dx: tap (r + dy, q + dx) */
                    or_shifted(out, plane + (r + dy) * wp + dx, wo, (uint32_t)(dy * kw + dx));
                }
        }
    }
    return 1;
}

PyObject *py_ew_chain(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *names[] = {"x",       "ops",     "operands", "out",   "table", "kernel",
                            "upsample", "threads", "pack_sub", "words", "sub",    NULL};
    PyObject *x_obj, *operands, *out_obj = Py_None, *t_obj = Py_None, *k_obj = Py_None;
    PyObject *ps_obj = Py_None, *w_obj = Py_None, *sub_obj = Py_None;
    const char *ops;
    int upsample = 0, threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OyO|OOOpiOOO", names, &x_obj, &ops, &operands,
                                     &out_obj, &t_obj, &k_obj, &upsample, &threads, &ps_obj,
                                     &w_obj, &sub_obj))
        return NULL;
    if ((ps_obj == Py_None) != (w_obj == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "pack_sub and words go together");
        return NULL;
    }
    const int nsteps = (int)strlen(ops), lut = t_obj != Py_None;
    if (lut && upsample) {
        PyErr_SetString(PyExc_ValueError, "table and upsample are exclusive starts");
        return NULL;
    }
    if (!PyTuple_Check(operands) || PyTuple_GET_SIZE(operands) != nsteps) {
        PyErr_SetString(PyExc_ValueError, "operands must be a tuple with one array per op");
        return NULL;
    }
    if (nsteps < !lut || nsteps > MAX_STEPS) {
        PyErr_Format(PyExc_ValueError, "a chain has %d to %d ops (got %d)", !lut, MAX_STEPS,
                     nsteps);
        return NULL;
    }
    int kh = 0, kwid = 0, ph = 0, pw = 0;
    if (lut && (!PyTuple_Check(k_obj) ||
                !PyArg_ParseTuple(k_obj, "iiii", &kh, &kwid, &ph, &pw))) {
        PyErr_SetString(PyExc_ValueError, "kernel must be (kh, kw, pad_h, pad_w)");
        return NULL;
    }
    if (lut && (kh < 1 || kwid < 1 || kh * kwid > 16 || ph < 0 || pw < 0 || ph >= kh ||
                pw >= kwid)) {
        PyErr_SetString(PyExc_ValueError,
                        "a table takes 1 <= kh * kw <= 16 taps and 0 <= pad < kernel size");
        return NULL;
    }
    Py_buffer xv, tv, t2v, ov[2 * MAX_STEPS], outv, psv, wv;
    int held = 0, table_held = 0, table2_held = 0, pack_held = 0, nsub = 0;
    const char *sub_ops = "";
    chain_step sub_steps[MAX_STEPS];
    PyObject *result = NULL;
    uint32_t *idx = NULL;
    uint8_t *plane = NULL;
    if (get_buffer(x_obj, &xv, lut ? "y" : "x", 'f', 0) < 0)
        return NULL;
    chain_step steps[MAX_STEPS];
    chain_start st = {(const float *)xv.buf, NULL, NULL, NULL, NULL, 0, 0};
    Py_ssize_t shape[4] = {0, 0, 0, 0};
    int ndim = xv.ndim;
    if (lut) {
        if (get_buffer(t_obj, &tv, "table", 'f', 0) < 0)
            goto done;
        table_held = 1;
        const Py_ssize_t rows = (Py_ssize_t)1 << (kh * kwid);
        if (xv.ndim != 3 || tv.ndim != 2 || tv.shape[0] != rows || tv.shape[1] < 1) {
            PyErr_Format(PyExc_ValueError, "y must be (N, H, W) and table (%zd, C)", rows);
            goto done;
        }
        const Py_ssize_t ho = xv.shape[1] + 2 * ph - kh + 1, wo = xv.shape[2] + 2 * pw - kwid + 1;
        if (ho < 1 || wo < 1) {
            PyErr_SetString(PyExc_ValueError, "y is smaller than the kernel");
            goto done;
        }
        shape[0] = xv.shape[0], shape[1] = ho, shape[2] = wo, shape[3] = tv.shape[1];
        ndim = 4;
    } else if (upsample) {
        if (xv.ndim != 4) {
            PyErr_SetString(PyExc_ValueError, "upsample takes NHWC x (N, H, W, C)");
            goto done;
        }
        shape[0] = xv.shape[0], shape[1] = 2 * xv.shape[1], shape[2] = 2 * xv.shape[2];
        shape[3] = xv.shape[3];
    } else
        for (int i = 0; i < ndim && i < 4; i++)
            shape[i] = xv.shape[i];
    if (ndim < 1 || ndim > 4) {
        PyErr_SetString(PyExc_ValueError, "x must have 1 to 4 dimensions (N, ..., C)");
        goto done;
    }
    Py_ssize_t size = 1;
    for (int i = 0; i < ndim; i++)
        size *= shape[i];
    const Py_ssize_t n = ndim >= 2 ? shape[0] : 1, c = shape[ndim - 1];
    if (c < 1 || c > CHUNK) {
        PyErr_Format(PyExc_ValueError, "the result must be (N, ..., C) with 1 <= C <= %d",
                     CHUNK);
        goto done;
    }
    if (sub_obj != Py_None) {
        if (!lut) {
            PyErr_SetString(PyExc_ValueError, "sub takes a table start");
            goto done;
        }
        if (!PyTuple_Check(sub_obj) || PyTuple_GET_SIZE(sub_obj) != 3 ||
            !PyBytes_Check(PyTuple_GET_ITEM(sub_obj, 1)) ||
            !PyTuple_Check(PyTuple_GET_ITEM(sub_obj, 2))) {
            PyErr_SetString(PyExc_ValueError, "sub must be (table, ops bytes, operands tuple)");
            goto done;
        }
        if (get_buffer(PyTuple_GET_ITEM(sub_obj, 0), &t2v, "sub table", 'f', 0) < 0)
            goto done;
        table2_held = 1;
        if (t2v.ndim != 2 || t2v.shape[0] != tv.shape[0] || t2v.shape[1] != c) {
            PyErr_SetString(PyExc_ValueError, "the sub table must have the table's shape");
            goto done;
        }
        sub_ops = PyBytes_AS_STRING(PyTuple_GET_ITEM(sub_obj, 1));
        nsub = (int)strlen(sub_ops);
        const Py_ssize_t nargs = PyTuple_GET_SIZE(PyTuple_GET_ITEM(sub_obj, 2));
        if (nsub > MAX_STEPS || nargs != nsub) {
            PyErr_Format(PyExc_ValueError,
                         "sub has %d ops and %zd operands: 0 to %d ops, one operand per op",
                         nsub, nargs, MAX_STEPS);
            goto done;
        }
    }
    /* the main chain's operands, then the sub chain's; None: the sub chain's value */
    int subs = 0;
    for (; held < nsteps + nsub; held++) {
        const int main = held < nsteps;
        const char op = main ? ops[held] : sub_ops[held - nsteps];
        PyObject *o_obj = main ? PyTuple_GET_ITEM(operands, held)
                               : PyTuple_GET_ITEM(PyTuple_GET_ITEM(sub_obj, 2), held - nsteps);
        chain_step *s = main ? &steps[held] : &sub_steps[held - nsteps];
        /* messages name an op or operand by its place in its own chain */
        const char *chain = main ? "operand" : "sub operand";
        const int place = main ? held : held - nsteps;
        if (!strchr("asrmp", op)) {
            PyErr_Format(PyExc_ValueError, "%s %d is %c; allowed values: a, s, r, m, p",
                         main ? "op" : "sub op", place, op);
            goto done;
        }
        s->op = op;
        s->bstride = 0;
        if (o_obj == Py_None && main && sub_obj != Py_None) {
            s->kind = SUB, s->p = NULL;
            subs++;
            continue;
        }
        if (o_obj == Py_None) {
            PyErr_Format(PyExc_ValueError,
                         main ? "%s %d is None without sub (None stands for sub's value)"
                              : "%s %d is None: only the main chain's operands may be None",
                         chain, place);
            goto done;
        }
        if (get_buffer(o_obj, &ov[held], chain, 'f', 0) < 0)
            goto done;
        /* the operand's kind from its shape (lengths alone can coincide: H * W == N) */
        const Py_buffer *o = &ov[held];
        const Py_ssize_t len = o->len / 4;
        int same = o->ndim == ndim, item = o->ndim == ndim && ndim >= 2 && o->shape[0] == 1;
        for (int i = 0; i < o->ndim && i < ndim; i++) {
            same = same && o->shape[i] == shape[i];
            item = item && (i == 0 || o->shape[i] == shape[i]);
        }
        s->p = (const float *)o->buf;
        if (len == 1)
            s->kind = SCALAR;
        else if (same)
            s->kind = FULL;
        else if (item)
            s->kind = ITEM;
        else if (o->ndim == 1 && len == c)
            s->kind = CHANNEL;
        else if (o->ndim == 2 && o->shape[1] == c && (o->shape[0] == 1 || o->shape[0] == n)) {
            s->kind = CHANNEL;
            s->bstride = o->shape[0] == 1 ? 0 : c;
        } else {
            PyErr_Format(PyExc_ValueError,
                         "%s %d has %zd values in %d dimensions: the result's shape, one "
                         "item of it (1, ...), (C,) with C = %zd, (N, C) or one value allowed",
                         chain, place, len, o->ndim, c);
            PyBuffer_Release(&ov[held]);
            goto done;
        }
    }
    if (sub_obj != Py_None && subs == 0) {
        PyErr_SetString(PyExc_ValueError, "sub given but no operand is None (its value)");
        goto done;
    }
    if (w_obj != Py_None) {
        if (get_buffer(ps_obj, &psv, "pack_sub", 'f', 0) < 0)
            goto done;
        if (get_buffer(w_obj, &wv, "words", 'i', 1) < 0) {
            PyBuffer_Release(&psv);
            goto done;
        }
        pack_held = 1;
        const Py_ssize_t wd = (c + 31) / 32, plen = psv.len / 4;
        if (wv.len / 4 != size / c * wd || (plen != c && plen != n * c)) {
            PyErr_Format(PyExc_ValueError,
                         "words must hold %zd words (a pixel's %zd) and pack_sub C or N * C "
                         "values", size / c * wd, wd);
            goto done;
        }
        memset(wv.buf, 0, (size_t)wv.len);
        st.words = (uint32_t *)wv.buf, st.psub = (const float *)psv.buf, st.wd = wd;
        st.psub_bstride = plen == c ? 0 : c;
    }
    if (size == 0) { /* an empty batch: nothing to compute (the arguments are checked) */
        result = output(out_obj, &outv, ndim, shape, 'f');
        if (result)
            PyBuffer_Release(&outv);
        goto done;
    }
    if (lut) {
        idx = malloc(sizeof(uint32_t) * (size_t)(size / c));
        plane = malloc((size_t)((xv.shape[1] + 2 * ph) * (xv.shape[2] + 2 * pw)));
        if (!idx || !plane) {
            PyErr_NoMemory();
            goto done;
        }
        int binary;
        Py_BEGIN_ALLOW_THREADS
        binary = lut_rows((const float *)xv.buf, xv.shape[0], xv.shape[1], xv.shape[2], kh, kwid,
                          ph, pw, shape[1], shape[2], idx, plane);
        Py_END_ALLOW_THREADS
        if (!binary) { /* not a 0/1 map: the caller convolves it otherwise */
            result = Py_NewRef(Py_None);
            goto done;
        }
        st.x = NULL, st.idx = idx, st.table = (const float *)tv.buf;
        if (table2_held)
            st.table2 = (const float *)t2v.buf, st.sub = sub_steps, st.nsub = nsub;
    } else if (upsample) { /* rows of x: output pixel (b, r, q) reads (b, r / 2, q / 2) */
        idx = malloc(sizeof(uint32_t) * (size_t)(size / c));
        if (!idx) {
            PyErr_NoMemory();
            goto done;
        }
        const Py_ssize_t h = xv.shape[1], w = xv.shape[2];
        for (Py_ssize_t b = 0; b < shape[0]; b++)
            for (Py_ssize_t r = 0; r < 2 * h; r++)
                for (Py_ssize_t q = 0; q < 2 * w; q++)
                    idx[(b * 2 * h + r) * 2 * w + q] = (uint32_t)((b * h + r / 2) * w + q / 2);
        st.x = NULL, st.idx = idx, st.table = (const float *)xv.buf;
    }
    result = output(out_obj, &outv, ndim, shape, 'f');
    if (!result)
        goto done;
    {
        Py_BEGIN_ALLOW_THREADS
        chain_run(&st, (float *)outv.buf, size, n, c, steps, nsteps, threads);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&outv);
done:
    free(idx);
    free(plane);
    for (int k = 0; k < held; k++)
        if (!(k < nsteps && steps[k].kind == SUB)) /* a SUB step holds no buffer */
            PyBuffer_Release(&ov[k]);
    if (table_held)
        PyBuffer_Release(&tv);
    if (table2_held)
        PyBuffer_Release(&t2v);
    if (pack_held) {
        PyBuffer_Release(&psv);
        PyBuffer_Release(&wv);
    }
    PyBuffer_Release(&xv);
    return result;
}
