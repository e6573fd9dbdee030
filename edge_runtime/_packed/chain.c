/* Elementwise work of the packed backend's step in native passes (ew_chain).
 *
 *     v = start[i];  for each step k:  v = op_k(v, operand_k[i])
 *
 * With pack_sub and words the pass also writes the next binary layer's packed input: the sign
 * bits of result - pack_sub (edge_runtime.packed's word format).
 * start: a float32 NHWC feature map x, x upsampled 2x by nearest neighbour (each pixel
 * repeated 2 x 2), or the convolution of a 0/1 map y (the diffusion state y_t) through a
 * table: out[n, h, w, :] = table[idx], bit dy * kw + dx of idx set where the tap
 * (h + dy - pad_h, w + dx - pad_w) lies inside and holds 1 (stride 1, zero padding).  The table
 * row of each pattern is the convolution's own output for it (edge_runtime.lut), so the lookup
 * does no arithmetic.
 * op: 'a' v + o, 's' v - o, 'r' o - v, 'm' v * o, 'p' (v < 0 ? v * o : v) (PReLU, o the
 * slope); operand: a full array like the result, one batch item of it (shared by the items: the
 * chains of one image), one value per channel (shared or per batch item) or a scalar.  Each step
 * is one IEEE float32 operation in the graph's order (the build keeps -ffp-contract=off: no
 * FMA), so the result equals the ops one by one bit for bit.  With C a multiple of 16 the
 * running value stays in registers; otherwise the map goes in chunks of whole pixels through a
 * stack buffer.  Either way every input is read once and out written once, and out may be x or
 * any full operand (each element or chunk is read completely before it is written).  Compiled
 * per target (AVX-512, AVX2, baseline); the one of the default kernel path (set_path) runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>

#include "glue.h"

#if HIDIFF_X86 && defined(__GNUC__)
#include <immintrin.h>
#endif

#define MAX_STEPS 16
#define CHUNK 2048 /* floats per chunk (8 KiB) */

enum { FULL = 0, CHANNEL = 1, SCALAR = 2, ITEM = 3 };

typedef struct {
    const float *x;        /* the start map, or NULL with a table */
    const uint32_t *idx;   /* [n * pixels] table rows (with a table) */
    const float *table;    /* [rows][c] or NULL */
    /* optional: the next binary layer's input, bit c of word c / 32 of each pixel set where
     * result - psub[c] < 0 (the float32 difference, as ONNX Sub then the sign) */
    uint32_t *words;       /* [n * pixels][wd], zeroed, or NULL */
    const float *psub;     /* [n or 1][c] */
    Py_ssize_t psub_bstride, wd;
} chain_start;

typedef struct {
    char op;
    int kind;
    const float *p;      /* FULL: like x; ITEM: one batch item of x, shared by all;
                          * CHANNEL: [n or 1][c]; SCALAR: one value */
    Py_ssize_t bstride;  /* CHANNEL: floats between batch items (0: shared) */
} chain_step;

#define CHAIN_OP(EXPR)                                                                         \
    do {                                                                                       \
        if (s->kind == FULL || s->kind == ITEM) {                                              \
            const float *restrict o = s->p + (s->kind == FULL ? base : at);                    \
            for (Py_ssize_t i = 0; i < len; i++) {                                             \
                const float v = buf[i], w = o[i];                                              \
                buf[i] = EXPR;                                                                 \
            }                                                                                  \
        } else if (s->kind == CHANNEL) {                                                       \
            const float *restrict o = s->p + b * s->bstride;                                   \
            for (Py_ssize_t q = 0; q < len; q += c)                                            \
                for (Py_ssize_t j = 0; j < c; j++) {                                           \
                    const float v = buf[q + j], w = o[j];                                      \
                    buf[q + j] = EXPR;                                                         \
                }                                                                              \
        } else {                                                                               \
            const float w = s->p[0];                                                           \
            for (Py_ssize_t i = 0; i < len; i++) {                                             \
                const float v = buf[i];                                                        \
                buf[i] = EXPR;                                                                 \
            }                                                                                  \
        }                                                                                      \
    } while (0)

/* Elements [e0, e1) (whole pixels) item by item: the body sees b (batch item), i0, i1 (the range
 * inside the item) and base0 = b * per_item. */
#define FOR_ITEMS(...)                                                                         \
    for (Py_ssize_t e = e0; e < e1;) {                                                         \
        const Py_ssize_t b = e / per_item, base0 = b * per_item;                               \
        const Py_ssize_t i0 = e - base0,                                                       \
                         i1 = (e1 < base0 + per_item ? e1 : base0 + per_item) - base0;         \
        __VA_ARGS__;                                                                           \
        e = base0 + i1;                                                                        \
    }

#define DEFINE_CHAIN(NAME, ATTR)                                                               \
    ATTR static void NAME(const chain_start *st, float *out, Py_ssize_t per_item, Py_ssize_t c,\
                          const chain_step *steps, int nsteps, Py_ssize_t e0, Py_ssize_t e1)   \
    {                                                                                          \
        float buf[CHUNK];                                                                      \
        const Py_ssize_t span = c <= CHUNK ? (CHUNK / c) * c : c;                              \
        FOR_ITEMS(for (Py_ssize_t at = i0; at < i1; at += span) {                              \
            const Py_ssize_t len = i1 - at < span ? i1 - at : span;                            \
            const Py_ssize_t base = base0 + at;                                                \
            if (st->table) {                                                                   \
                const uint32_t *ix = st->idx + base / c;                                       \
                for (Py_ssize_t q = 0; q < len; q += c, ix++)                                  \
                    memcpy(buf + q, st->table + (size_t)*ix * (size_t)c,                       \
                           sizeof(float) * (size_t)c);                                         \
            }                                                                                  \
            else                                                                               \
                memcpy(buf, st->x + base, sizeof(float) * (size_t)len);                        \
            for (int k = 0; k < nsteps; k++) {                                                 \
                const chain_step *s = &steps[k];                                               \
                switch (s->op) {                                                               \
                case 'a': CHAIN_OP(v + w); break;                                              \
                case 's': CHAIN_OP(v - w); break;                                              \
                case 'r': CHAIN_OP(w - v); break;                                              \
                case 'm': CHAIN_OP(v * w); break;                                              \
                default: {                                                                     \
                    /* 'p': the product computed always, a branch-free select */               \
                    CHAIN_OP(v < 0.0f ? v * w : v);                                            \
                    break;                                                                     \
                }                                                                              \
                }                                                                              \
            }                                                                                  \
            if (st->words) {                                                                   \
                const float *ps = st->psub + b * st->psub_bstride;                             \
                uint32_t *wp = st->words + (size_t)(base / c) * (size_t)st->wd;                \
                for (Py_ssize_t q = 0; q < len; q += c, wp += st->wd)                          \
                    for (Py_ssize_t jj = 0; jj < c; jj++)                                      \
                        wp[jj / 32] |= (uint32_t)(buf[q + jj] - ps[jj] < 0.0f) << (jj % 32);   \
            }                                                                                  \
            memcpy(out + base, buf, sizeof(float) * (size_t)len);                              \
        })                                                                                     \
    }

/* The same with the running value in registers: VEC floats at a time, each step applied while
 * they are loaded; for C a multiple of VEC (every per-channel operand then lines up).  A scalar
 * operand is broadcast as s - (+0), which is s for every s (0 + s would turn -0 into +0). */
#define VEC 16
typedef float vecf __attribute__((vector_size(VEC * 4)));
typedef int32_t veci __attribute__((vector_size(VEC * 4)));

#define VLOAD(p) ({ vecf v_; memcpy(&v_, (p), sizeof v_); v_; })
/* Bit k set where lane k of d is < 0 (false for NaN), per instruction set. */
#define BITS_512(d)                                                                            \
    ({                                                                                         \
        __m512 x_;                                                                             \
        memcpy(&x_, &(d), sizeof x_);                                                          \
        (uint32_t)_mm512_cmp_ps_mask(x_, _mm512_setzero_ps(), _CMP_LT_OQ);                     \
    })
#define BITS_256(d)                                                                            \
    ({                                                                                         \
        __m256 lo_, hi_;                                                                       \
        memcpy(&lo_, &(d), sizeof lo_);                                                        \
        memcpy(&hi_, (const char *)&(d) + sizeof lo_, sizeof hi_);                             \
        const __m256 z_ = _mm256_setzero_ps();                                                 \
        (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(lo_, z_, _CMP_LT_OQ)) |                     \
            (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(hi_, z_, _CMP_LT_OQ)) << 8;             \
    })
#define BITS_PLAIN(d)                                                                          \
    ({                                                                                         \
        uint32_t b_ = 0;                                                                       \
        for (int k_ = 0; k_ < VEC; k_++)                                                       \
            b_ |= (uint32_t)((d)[k_] < 0.0f) << k_;                                            \
        b_;                                                                                    \
    })
#define DEFINE_CHAIN_VEC(NAME, ATTR, BITS)                                                      \
    ATTR static void NAME(const chain_start *st, float *out, Py_ssize_t per_item, Py_ssize_t c,\
                          const chain_step *steps, int nsteps, Py_ssize_t e0, Py_ssize_t e1)   \
    {                                                                                          \
        FOR_ITEMS(Py_ssize_t pix = (base0 + i0) / c; /* pixel counter: no division below */    \
                  for (Py_ssize_t p = i0; p < i1; p += c, pix++) {                             \
            const float *row = st->table ? st->table + (size_t)st->idx[pix] * (size_t)c        \
                                         : st->x + base0 + p;                                  \
            for (Py_ssize_t j = 0; j < c; j += VEC) {                                          \
                const Py_ssize_t i = p + j, at = base0 + i;                                    \
                vecf v = VLOAD(row + j);                                                       \
                for (int k = 0; k < nsteps; k++) {                                             \
                    const chain_step *s = &steps[k];                                           \
                    const vecf w = s->kind == FULL      ? VLOAD(s->p + at)                     \
                                   : s->kind == ITEM    ? VLOAD(s->p + i)                      \
                                   : s->kind == CHANNEL ? VLOAD(s->p + b * s->bstride + j)     \
                                                        : s->p[0] - (vecf){0};                 \
                    switch (s->op) {                                                           \
                    case 'a': v = v + w; break;                                                \
                    case 's': v = v - w; break;                                                \
                    case 'r': v = w - v; break;                                                \
                    case 'm': v = v * w; break;                                                \
                    default: {                                                                 \
                        const vecf neg = v * w;                                                \
                        const veci m = v < (vecf){0};                                          \
                        v = (vecf)(((veci)neg & m) | ((veci)v & ~m));                          \
                        break;                                                                 \
                    }                                                                          \
                    }                                                                          \
                }                                                                              \
                if (st->words) { /* 16 sign bits: half a word */                               \
                    const vecf dv = v - VLOAD(st->psub + b * st->psub_bstride + j);            \
                    st->words[(size_t)pix * (size_t)st->wd + (size_t)(j / 32)] |=              \
                        BITS(dv) << (j % 32);                                                  \
                }                                                                              \
                memcpy(out + at, &v, sizeof v);                                                \
            }                                                                                  \
        })                                                                                     \
    }

#if HIDIFF_X86 && defined(__GNUC__)
DEFINE_CHAIN(chain_avx512, __attribute__((target("avx512f"))))
DEFINE_CHAIN(chain_avx2, __attribute__((target("avx2"))))
DEFINE_CHAIN_VEC(chain_vec_avx512, __attribute__((target("avx512f"))), BITS_512)
DEFINE_CHAIN_VEC(chain_vec_avx2, __attribute__((target("avx2"))), BITS_256)
#endif
DEFINE_CHAIN(chain_base, )
DEFINE_CHAIN_VEC(chain_vec_base, , BITS_PLAIN)

typedef void (*chain_fn)(const chain_start *, float *, Py_ssize_t, Py_ssize_t,
                         const chain_step *, int, Py_ssize_t, Py_ssize_t);

typedef struct {
    chain_fn fn;
    const chain_start *st;
    float *out;
    Py_ssize_t per_item, c;
    const chain_step *steps;
    int nsteps;
} chain_job;

static void chain_range(void *ctx, Py_ssize_t lo, Py_ssize_t hi)
{
    const chain_job *j = ctx;
    j->fn(j->st, j->out, j->per_item, j->c, j->steps, j->nsteps, lo, hi);
}

/* The variant of the default kernel path (set_path), for C a multiple of VEC or not. */
static chain_fn pick_chain(int vec)
{
#if HIDIFF_X86 && defined(__GNUC__)
    const char *path = default_path_name();
    if (strcmp(path, "avx512") == 0)
        return vec ? chain_vec_avx512 : chain_avx512;
    if (strcmp(path, "avx2") == 0)
        return vec ? chain_vec_avx2 : chain_avx2;
#endif
    return vec ? chain_vec_base : chain_base;
}

/* Table rows of every output pixel of the 0/1 map y (n, h, w); 0 when y holds anything but
 * +0.0 and 1.0. */
static int lut_rows(const float *y, Py_ssize_t n, Py_ssize_t h, Py_ssize_t w, int kh, int kw,
                    int ph, int pw, Py_ssize_t ho, Py_ssize_t wo, uint32_t *idx, uint32_t *col)
{
    for (Py_ssize_t i = 0; i < n * h * w; i++) {
        uint32_t bits;
        memcpy(&bits, y + i, 4);
        if (bits != 0u && bits != 0x3F800000u)
            return 0;
    }
    const Py_ssize_t wp = w + 2 * pw;
    for (Py_ssize_t b = 0; b < n; b++)
        for (Py_ssize_t r = 0; r < ho; r++) {
            /* col[x]: bit dy * kw for each kernel row dy where padded column x holds 1 */
            memset(col, 0, sizeof(uint32_t) * (size_t)wp);
            for (int dy = 0; dy < kh; dy++) {
                const Py_ssize_t yy = r + dy - ph;
                if (yy < 0 || yy >= h)
                    continue;
                const float *row = y + (b * h + yy) * w;
                for (Py_ssize_t x = 0; x < w; x++)
                    col[x + pw] |= (uint32_t)(row[x] != 0.0f) << (dy * kw);
            }
            uint32_t *out = idx + (b * ho + r) * wo;
            for (Py_ssize_t q = 0; q < wo; q++) {
                uint32_t v = 0;
                for (int dx = 0; dx < kw; dx++)
                    v |= col[q + dx] << dx;
                out[q] = v;
            }
        }
    return 1;
}

PyObject *py_ew_chain(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *names[] = {"x",       "ops",     "operands", "out",   "table", "kernel",
                            "upsample", "threads", "pack_sub", "words", NULL};
    PyObject *x_obj, *operands, *out_obj = Py_None, *t_obj = Py_None, *k_obj = Py_None;
    PyObject *ps_obj = Py_None, *w_obj = Py_None;
    const char *ops;
    int upsample = 0, threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OyO|OOOpiOO", names, &x_obj, &ops, &operands,
                                     &out_obj, &t_obj, &k_obj, &upsample, &threads, &ps_obj,
                                     &w_obj))
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
    Py_buffer xv, tv, ov[MAX_STEPS], outv, psv, wv;
    int held = 0, table_held = 0, pack_held = 0;
    PyObject *result = NULL;
    uint32_t *idx = NULL, *col = NULL;
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
    if (c < 1 || c > CHUNK || size % n) {
        PyErr_Format(PyExc_ValueError, "the result must be (N, ..., C) with 1 <= C <= %d",
                     CHUNK);
        goto done;
    }
    for (; held < nsteps; held++) {
        const char op = ops[held];
        if (!strchr("asrmp", op)) {
            PyErr_Format(PyExc_ValueError, "unknown op %c; allowed values: a, s, r, m, p", op);
            goto done;
        }
        if (get_buffer(PyTuple_GET_ITEM(operands, held), &ov[held], "operand", 'f', 0) < 0)
            goto done;
        const Py_ssize_t len = ov[held].len / 4;
        chain_step *s = &steps[held];
        s->op = op;
        s->p = (const float *)ov[held].buf;
        s->bstride = 0;
        if (len == size && size != c && size != 1)
            s->kind = FULL;
        else if (n > 1 && len == size / n && len != c)
            s->kind = ITEM;
        else if (len == 1)
            s->kind = SCALAR;
        else if (len == c)
            s->kind = CHANNEL;
        else if (len == n * c) {
            s->kind = CHANNEL;
            s->bstride = c;
        } else {
            PyErr_Format(PyExc_ValueError,
                         "operand %d has %zd values: the result's size %zd, one item's, C = %zd, "
                         "N * C or 1 allowed", held, len, size, c);
            PyBuffer_Release(&ov[held]);
            goto done;
        }
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
    if (lut) {
        idx = malloc(sizeof(uint32_t) * (size_t)(size / c));
        col = malloc(sizeof(uint32_t) * (size_t)(xv.shape[2] + 2 * pw));
        if (!idx || !col) {
            PyErr_NoMemory();
            goto done;
        }
        int binary;
        Py_BEGIN_ALLOW_THREADS
        binary = lut_rows((const float *)xv.buf, xv.shape[0], xv.shape[1], xv.shape[2], kh, kwid,
                          ph, pw, shape[1], shape[2], idx, col);
        Py_END_ALLOW_THREADS
        if (!binary) { /* not a 0/1 map: the caller convolves it otherwise */
            result = Py_NewRef(Py_None);
            goto done;
        }
        st.x = NULL, st.idx = idx, st.table = (const float *)tv.buf;
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
        const chain_job job = {pick_chain(c % VEC == 0), &st, (float *)outv.buf, size / n, c,
                               steps, nsteps};
        Py_BEGIN_ALLOW_THREADS
        run_parallel(threads, size, c, 1 << 18, chain_range, (void *)&job);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&outv);
done:
    free(idx);
    free(col);
    for (int k = 0; k < held; k++)
        PyBuffer_Release(&ov[k]);
    if (table_held)
        PyBuffer_Release(&tv);
    if (pack_held) {
        PyBuffer_Release(&psv);
        PyBuffer_Release(&wv);
    }
    PyBuffer_Release(&xv);
    return result;
}
