/* Python glue of the binary convolution: prepared weights (a capsule) and bconv2d. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>

#include "glue.h"

/* Largest kernel / stride / dilation / padding accepted (far beyond any real layer). */
#define GEOM_MAX (1 << 16)

/* ---- prepared weights ------------------------------------------------------------------ */

#define CAPSULE_NAME "edge_runtime._packed.PreparedWeights"

static void capsule_free(PyObject *cap)
{
    free_prepared(PyCapsule_GetPointer(cap, CAPSULE_NAME));
}

/* Prepared weights from packed OHWI words (new prepared_t, or NULL with an exception). */
static prepared_t *prepare_from(PyObject *w_obj, int cin, int kh, int kw, int pi)
{
    Py_buffer wv;
    const Py_ssize_t wd = (cin + 31) / 32;
    if (cin < 1 || kh < 1 || kw < 1) {
        PyErr_Format(PyExc_ValueError, "need cin, kh, kw >= 1 (got %d, %d, %d)", cin, kh, kw);
        return NULL;
    }
    if ((long long)cin * kh * kw > (1LL << 24)) {
        PyErr_SetString(PyExc_ValueError, "cin * kh * kw must be <= 2**24 (exact float32)");
        return NULL;
    }
    if (get_buffer(w_obj, &wv, "w", 'i', 0) < 0)
        return NULL;
    if (wv.ndim != 4 || wv.shape[1] != kh || wv.shape[2] != kw || wv.shape[3] != wd ||
        wv.shape[0] < 1 || wv.shape[0] > (1 << 24)) {
        PyErr_Format(PyExc_ValueError,
                     "w must be packed OHWI (Cout >= 1, kh=%d, kw=%d, ceil(cin/32)=%zd)", kh, kw,
                     wd);
        PyBuffer_Release(&wv);
        return NULL;
    }
    prepared_t *p;
    Py_BEGIN_ALLOW_THREADS
    p = prepare_weights(wv.buf, (int)wv.shape[0], cin, kh, kw, pi, &PATHS[pi]);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&wv);
    if (!p)
        PyErr_NoMemory();
    return p;
}

PyObject *py_prepare(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"w", "cin", "kh", "kw", "path", NULL};
    PyObject *w_obj, *path_obj = NULL;
    int cin, kh, kw_;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oiii|O:prepare", kwlist, &w_obj, &cin, &kh, &kw_,
                                     &path_obj))
        return NULL;
    const int pi = resolve_path(path_obj);
    if (pi < 0)
        return NULL;
    prepared_t *p = prepare_from(w_obj, cin, kh, kw_, pi);
    if (!p)
        return NULL;
    PyObject *cap = PyCapsule_New(p, CAPSULE_NAME, capsule_free);
    if (!cap)
        free_prepared(p);
    return cap;
}

PyObject *py_prepared_info(PyObject *self, PyObject *cap)
{
    prepared_t *p = PyCapsule_GetPointer(cap, CAPSULE_NAME);
    if (!p)
        return NULL;
    return Py_BuildValue("{s:s,s:i,s:i,s:i,s:i}", "path", PATHS[p->path].name, "cout", p->cout,
                         "cin", p->cin, "kh", p->kh, "kw", p->kw);
}

/* ---- bconv2d ---------------------------------------------------------------------------- */

static int opt_vector(PyObject *obj, Py_buffer *v, const char *what, Py_ssize_t n)
{
    if (obj == NULL || obj == Py_None) {
        v->obj = NULL;
        v->buf = NULL;
        return 0;
    }
    if (get_buffer(obj, v, what, 'f', 0) < 0)
        return -1;
    if (v->ndim != 1 || v->shape[0] != n) {
        PyErr_Format(PyExc_ValueError, "%s must have shape (%zd,) (one value per output channel)",
                     what, n);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

static void release(Py_buffer *v)
{
    if (v->obj)
        PyBuffer_Release(v);
    v->obj = NULL;
}

PyObject *py_bconv2d(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"x", "w", "cin", "kh", "kw", "stride_h", "stride_w", "pad_h",
                             "pad_w", "dil_h", "dil_w", "pad_value", "scale", "bias",
                             "thresholds", "out", "path", "threads", "residual", "zeta",
                             "slope", "gamma", "pack_sub", "packed_out", NULL};
    PyObject *x_obj, *w_obj, *pv_obj, *sc_obj = NULL, *bi_obj = NULL, *th_obj = NULL;
    PyObject *out_obj = NULL, *path_obj = NULL, *res_obj = NULL, *ze_obj = NULL;
    PyObject *sl_obj = NULL, *ga_obj = NULL, *ps_obj = NULL, *pout_obj = NULL;
    int cin, kh, kw_, sh, sw, ph, pw, dh, dw, threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOiiiiiiiiiO|OOOOOi$OOOOOO:bconv2d", kwlist,
                                     &x_obj, &w_obj, &cin, &kh, &kw_, &sh, &sw, &ph, &pw, &dh,
                                     &dw, &pv_obj, &sc_obj, &bi_obj, &th_obj, &out_obj,
                                     &path_obj, &threads, &res_obj, &ze_obj, &sl_obj, &ga_obj,
                                     &ps_obj, &pout_obj))
        return NULL;
    const int want_words = ps_obj != NULL && ps_obj != Py_None;
    prepared_t *prep = NULL, *owned = NULL;
    if (PyCapsule_IsValid(w_obj, CAPSULE_NAME)) {
        prep = PyCapsule_GetPointer(w_obj, CAPSULE_NAME);
        if (prep->cin != cin || prep->kh != kh || prep->kw != kw_)
            return PyErr_Format(PyExc_ValueError,
                                "prepared weights are for cin=%d, kernel %dx%d, not cin=%d, %dx%d",
                                prep->cin, prep->kh, prep->kw, cin, kh, kw_);
        if (path_obj && path_obj != Py_None) {
            const int pi = resolve_path(path_obj);
            if (pi < 0)
                return NULL;
            if (pi != prep->path)
                return PyErr_Format(PyExc_ValueError, "weights were prepared for path '%s', not %R",
                                    PATHS[prep->path].name, path_obj);
        }
    }
    const double pv = PyFloat_AsDouble(pv_obj);
    if (pv == -1.0 && PyErr_Occurred())
        return NULL;
    if (pv != 0.0 && pv != 1.0)
        return PyErr_Format(PyExc_ValueError, "pad_value must be 1.0 or 0.0, got %R", pv_obj);
    if (cin < 1 || kh < 1 || kw_ < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1 || ph < 0 ||
        pw < 0 || threads < 1)
        return PyErr_Format(PyExc_ValueError,
                            "need cin, kh, kw, strides, dilations, threads >= 1 and paddings "
                            ">= 0 (got cin=%d kernel=%dx%d stride=%d,%d pad=%d,%d dil=%d,%d "
                            "threads=%d)", cin, kh, kw_, sh, sw, ph, pw, dh, dw, threads);
    /* Bound every geometry value so that no product below can overflow (they are computed in
       Py_ssize_t, and the padded sizes are checked against INT32_MAX before any allocation). */
    if (kh > GEOM_MAX || kw_ > GEOM_MAX || sh > GEOM_MAX || sw > GEOM_MAX || dh > GEOM_MAX ||
        dw > GEOM_MAX || ph > GEOM_MAX || pw > GEOM_MAX)
        return PyErr_Format(PyExc_ValueError,
                            "kernel, stride, dilation and padding must be <= %d (got kernel=%dx%d "
                            "stride=%d,%d pad=%d,%d dil=%d,%d)", GEOM_MAX, kh, kw_, sh, sw, ph, pw,
                            dh, dw);
    if (!prep) {
        const int pi = resolve_path(path_obj);
        if (pi < 0)
            return NULL;
        prep = owned = prepare_from(w_obj, cin, kh, kw_, pi);
        if (!prep)
            return NULL;
    }

    Py_buffer xv = {0}, scv = {0}, biv = {0}, thv = {0}, ov = {0}, rv = {0}, zv = {0}, slv = {0};
    Py_buffer gv = {0}, psv = {0}, pov = {0};
    PyObject *res = NULL, *words = NULL;
    int zb = 0, gb = 0, pb = 0, sb = 0;
    const Py_ssize_t wd = (cin + 31) / 32;
    if (get_buffer(x_obj, &xv, "x", 'i', 0) < 0)
        goto fail;
    if (xv.ndim != 4 || xv.shape[3] != wd) {
        PyErr_Format(PyExc_ValueError,
                     "x must be packed NHWC (N, H, W, ceil(cin/32) = %zd), got %d axes", wd,
                     xv.ndim);
        goto fail;
    }
    const Py_ssize_t n = xv.shape[0], h = xv.shape[1], w = xv.shape[2], cout = prep->cout;
    const Py_ssize_t hp = h + 2 * (Py_ssize_t)ph, wp = w + 2 * (Py_ssize_t)pw;
    const Py_ssize_t hspan = (Py_ssize_t)dh * (kh - 1) + 1, wspan = (Py_ssize_t)dw * (kw_ - 1) + 1;
    const Py_ssize_t ho = (hp - hspan) / sh + 1;
    const Py_ssize_t wo = (wp - wspan) / sw + 1;
    if (hp - hspan < 0 || wp - wspan < 0 || ho < 1 || wo < 1) {
        PyErr_Format(PyExc_ValueError, "empty output: input %zdx%zd, kernel %dx%d, stride %d,%d,"
                     " padding %d,%d, dilation %d,%d", h, w, kh, kw_, sh, sw, ph, pw, dh, dw);
        goto fail;
    }
    if (hp > INT32_MAX || wp > INT32_MAX || n * hp > INT32_MAX ||
        n * hp * wp > INT32_MAX / wd || n * ho > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "input too large");
        goto fail;
    }
    if (opt_vector(sc_obj, &scv, "scale", cout) < 0 || opt_vector(bi_obj, &biv, "bias", cout) < 0
        || opt_vector(th_obj, &thv, "thresholds", cout) < 0)
        goto fail;
    const int packed_out = thv.obj != NULL;
    if (opt_channels(ze_obj, &zv, "zeta", n, cout, &zb) < 0 ||
        opt_channels(sl_obj, &slv, "slope", 1, cout, &sb) < 0 ||
        opt_channels(ga_obj, &gv, "gamma", n, cout, &gb) < 0 ||
        opt_channels(ps_obj, &psv, "pack_sub", n, cout, &pb) < 0)
        goto fail;
    const int epilogue = (res_obj && res_obj != Py_None) || zv.obj || slv.obj || gv.obj;
    if (packed_out && (epilogue || want_words)) {
        PyErr_SetString(PyExc_ValueError, "thresholds (packed output) cannot be combined with "
                        "the epilogue (residual, zeta, slope, gamma, pack_sub)");
        goto fail;
    }
    if (slv.obj && slv.ndim != 1) {
        PyErr_Format(PyExc_ValueError, "slope must have shape (%zd,)", cout);
        goto fail;
    }
    const Py_ssize_t oshape[4] = {n, ho, wo, packed_out ? (cout + 31) / 32 : cout};
    res = output(out_obj, &ov, 4, oshape, packed_out ? 'i' : 'f');
    if (!res)
        goto fail;
    if (res_obj && res_obj != Py_None) {
        if (get_buffer(res_obj, &rv, "residual", 'f', 0) < 0)
            goto fail;
        int ok = rv.ndim == 4;
        for (int i = 0; ok && i < 4; i++)
            ok = rv.shape[i] == oshape[i];
        if (!ok) {
            PyErr_SetString(PyExc_ValueError, "residual must be float32 NHWC of the output's shape");
            goto fail;
        }
        const char *r0 = rv.buf, *o0 = ov.buf;
        const size_t bytes = (size_t)(n * ho * wo * cout) * sizeof(float);
        if (r0 != o0 && r0 < o0 + bytes && o0 < r0 + bytes) {
            PyErr_SetString(PyExc_ValueError, "residual must be out itself or not overlap it");
            goto fail;
        }
    }
    if (want_words) {
        const Py_ssize_t wshape[4] = {n, ho, wo, (cout + 31) / 32};
        words = output(pout_obj, &pov, 4, wshape, 'i');
        if (!words)
            goto fail;
    }
    bconv_args a = {
        .x = xv.buf, .n = (int)n, .h = (int)h, .w = (int)w, .cin = cin, .prep = prep,
        .cout = (int)cout, .kh = kh, .kw = kw_, .sh = sh, .sw = sw, .ph = ph, .pw = pw,
        .dh = dh, .dw = dw, .pad_zero = pv == 0.0, .scale = scv.buf, .bias = biv.buf,
        .thr = thv.buf, .out = ov.buf, .ho = (int)ho, .wo = (int)wo, .threads = threads,
        .row = PATHS[prep->path].row, .res = rv.obj ? rv.buf : NULL, .zeta = zv.buf,
        .slope = slv.buf, .gamma = gv.buf, .pthr = psv.buf, .zeta_bstride = zb,
        .gamma_bstride = gb, .pthr_bstride = pb, .pout = pov.obj ? pov.buf : NULL,
        .pack = PATHS[prep->path].pack, .epilogue = PATHS[prep->path].epilogue,
        .fuses_epilogue = PATHS[prep->path].fuses_epilogue,
    };
    int status = 0;
    if (n > 0) {
        Py_BEGIN_ALLOW_THREADS
        status = bconv_run(&a);
        Py_END_ALLOW_THREADS
    }
    if (status < 0) {
        PyErr_NoMemory();
        Py_CLEAR(res);
    }
    if (res && words) {
        PyObject *pair = PyTuple_Pack(2, res, words);
        Py_DECREF(res);
        res = pair;
    }
    goto done;
fail:
    Py_CLEAR(res);
done:
    Py_XDECREF(words);
    release(&rv);
    release(&zv);
    release(&slv);
    release(&gv);
    release(&psv);
    release(&pov);
    release(&xv);
    free_prepared(owned);
    release(&scv);
    release(&biv);
    release(&thv);
    release(&ov);
    return res;
}

