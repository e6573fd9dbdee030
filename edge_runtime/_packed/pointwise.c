/* 1 x 1 convolutions (pointwise) of NHWC float32 maps, in MLAS's order of float32 operations:
 *
 *     acc = 0;  for ic in 0 .. Cin-1:  acc = fma(x[p, ic], w[ic, oc], acc);  y = acc + bias[oc]
 *
 * (one rounding per fused multiply-add, input channels in order, the bias added last), which is
 * what onnxruntime's blocked (NCHWc) pointwise kernel computes; edge_runtime.pointwise checks
 * that per node against onnxruntime before using it.  With `add` (the decoder's
 * Add(Resize_2x(low), conv)) each result then becomes low[b, i / 2, j / 2, oc] + y, the one
 * float32 addition of that Add (commutative, so either operand order gives these bits).
 * Blocked over 4 pixels x up to 4 vectors
 * of output channels so that the multiply-adds of a block are independent.  Compiled per target
 * (AVX-512F + FMA, AVX2 + FMA, and plain C with fmaf); the default kernel path (set_path) picks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

#include "glue.h"

#define PW_PIX 4 /* pixels per block (and per thread chunk) */

/* The optional epilogue of an output of H x W pixels per item: the upsampled addend `low`, NHWC
 * (N, H / 2, W / 2, cout), and the packed sign words of (y - psub) (the next binary conv's
 * input, NHWC (N, H, W, ceil(cout / 32)) int32, as edge_runtime.packed packs them; psub cout
 * floats per item, psub_bstride 0 when shared). */
typedef struct {
    const float *low;
    Py_ssize_t h, w;
    const float *psub;
    Py_ssize_t psub_bstride;
    uint32_t *words;
    Py_ssize_t wd; /* words per pixel */
} pw_add;

/* A position in the output (batch item, row, column), advanced pixel by pixel: no division
 * per block. */
typedef struct {
    Py_ssize_t item, i, j;
} pw_pos;

static inline pw_pos pw_seek(const pw_add *a, Py_ssize_t q)
{
    if (a->h * a->w == 0) /* an empty map: no pixel to find */
        return (pw_pos){0, 0, 0};
    const Py_ssize_t r = q % (a->h * a->w);
    return (pw_pos){q / (a->h * a->w), r / a->w, r % a->w};
}

/* For the n output pixels from *pos (which moves past them): their item (b) and their addend
 * row in low (-1 without). */
static inline void pw_rows(const pw_add *a, pw_pos *pos, int n, Py_ssize_t *b, Py_ssize_t *lrow)
{
    for (int k = 0; k < n; k++) {
        b[k] = pos->item;
        lrow[k] = a->low ? (pos->item * (a->h / 2) + pos->i / 2) * (a->w / 2) + pos->j / 2 : -1;
        if (++pos->j == a->w) {
            pos->j = 0;
            if (++pos->i == a->h)
                pos->i = 0, pos->item++;
        }
    }
}

#if HIDIFF_X86 && defined(__GNUC__)
#include <immintrin.h>

#define PW_VEC 4
#define INL static inline __attribute__((always_inline))

/* One block: P pixels x G vectors of L output channels from oc0 (P, G compile-time). */
#define DEFINE_PW_BLOCK(NAME, ATTR, VT, L, LOAD, STORE, SET1, FMA, ADD, ZERO, SUB, BITS)     \
    INL ATTR void NAME(const float *x, const float *w, const float *bias, const pw_add *ad,   \
                       float *out, Py_ssize_t p, pw_pos *pos, Py_ssize_t oc0, Py_ssize_t cin, \
                       Py_ssize_t cout, const int P, const int G)                             \
    {                                                                                          \
        VT acc[PW_PIX][PW_VEC];                                                                \
        for (int i = 0; i < P; i++)                                                            \
            for (int v = 0; v < G; v++)                                                        \
                acc[i][v] = ZERO;                                                              \
        for (Py_ssize_t ic = 0; ic < cin; ic++) {                                              \
            VT wv[PW_VEC];                                                                     \
            for (int v = 0; v < G; v++)                                                        \
                wv[v] = LOAD(w + ic * cout + oc0 + v * L);                                     \
            for (int i = 0; i < P; i++) {                                                      \
                const VT xv = SET1(x[(p + i) * cin + ic]);                                     \
                for (int v = 0; v < G; v++)                                                    \
                    acc[i][v] = FMA(xv, wv[v], acc[i][v]);                                     \
            }                                                                                  \
        }                                                                                      \
        Py_ssize_t item[PW_PIX] = {0}, lrow[PW_PIX] = {0};                                     \
        if (ad)                                                                                \
            pw_rows(ad, pos, P, item, lrow);                                                   \
        for (int i = 0; i < P; i++) {                                                          \
            const float *lo = ad && ad->low ? ad->low + lrow[i] * cout + oc0 : NULL;           \
            const float *ps = ad && ad->words ? ad->psub + item[i] * ad->psub_bstride : NULL;  \
            uint64_t bits = 0; /* the block's sign bits (oc0 is a multiple of 32) */          \
            for (int v = 0; v < G; v++) {                                                      \
                VT y = acc[i][v];                                                              \
                if (bias)                                                                      \
                    y = ADD(y, LOAD(bias + oc0 + v * L));                                      \
                if (lo)                                                                        \
                    y = ADD(LOAD(lo + v * L), y);                                              \
                STORE(out + (p + i) * cout + oc0 + v * L, y);                                  \
                if (ps)                                                                        \
                    bits |= (uint64_t)BITS(SUB(y, LOAD(ps + oc0 + v * L))) << (v * L);         \
            }                                                                                  \
            if (ps) /* whole words: channels past the block's are past cout (or the next  */  \
                for (int k = 0; k * 32 < G * L; k++) /* block's, which writes its own) */     \
                    ad->words[(p + i) * ad->wd + oc0 / 32 + k] = (uint32_t)(bits >> (32 * k)); \
        }                                                                                      \
    }

#define DEFINE_PW(NAME, BLOCK, ATTR, L)                                                        \
    ATTR static void NAME(const float *x, const float *w, const float *bias, const pw_add *ad, \
                          float *out, Py_ssize_t p0, Py_ssize_t pixels, Py_ssize_t cin,       \
                          Py_ssize_t cout)                                                     \
    {                                                                                          \
        for (Py_ssize_t oc0 = 0; oc0 < cout; oc0 += PW_VEC * L) {                              \
            const int g = (int)((cout - oc0) / L < PW_VEC ? (cout - oc0) / L : PW_VEC);        \
            Py_ssize_t p = p0;                                                                 \
            pw_pos pos = ad ? pw_seek(ad, p0) : (pw_pos){0, 0, 0};                             \
            for (; p + PW_PIX <= pixels; p += PW_PIX)                                          \
                switch (g) {                                                                   \
                case 1: BLOCK(x, w, bias, ad, out, p, &pos, oc0, cin, cout, PW_PIX, 1); break;     \
                case 2: BLOCK(x, w, bias, ad, out, p, &pos, oc0, cin, cout, PW_PIX, 2); break;     \
                case 3: BLOCK(x, w, bias, ad, out, p, &pos, oc0, cin, cout, PW_PIX, 3); break;     \
                default: BLOCK(x, w, bias, ad, out, p, &pos, oc0, cin, cout, PW_PIX, 4); break;    \
                }                                                                              \
            for (; p < pixels; p++)                                                            \
                switch (g) {                                                                   \
                case 1: BLOCK(x, w, bias, ad, out, p, &pos, oc0, cin, cout, 1, 1); break;          \
                case 2: BLOCK(x, w, bias, ad, out, p, &pos, oc0, cin, cout, 1, 2); break;          \
                case 3: BLOCK(x, w, bias, ad, out, p, &pos, oc0, cin, cout, 1, 3); break;          \
                default: BLOCK(x, w, bias, ad, out, p, &pos, oc0, cin, cout, 1, 4); break;         \
                }                                                                              \
        }                                                                                      \
    }

#define BITS_512(d) _mm512_cmp_ps_mask((d), _mm512_setzero_ps(), _CMP_LT_OQ)
#define BITS_256(d) _mm256_movemask_ps(_mm256_cmp_ps((d), _mm256_setzero_ps(), _CMP_LT_OQ))
DEFINE_PW_BLOCK(blk_avx512, __attribute__((target("avx512f,fma"))), __m512, 16,
                _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps,
                _mm512_add_ps, _mm512_setzero_ps(), _mm512_sub_ps, BITS_512)
DEFINE_PW_BLOCK(blk_avx2, __attribute__((target("avx2,fma"))), __m256, 8, _mm256_loadu_ps,
                _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps,
                _mm256_setzero_ps(), _mm256_sub_ps, BITS_256)
DEFINE_PW(pw_avx512, blk_avx512, __attribute__((target("avx512f,fma"))), 16)
DEFINE_PW(pw_avx2, blk_avx2, __attribute__((target("avx2,fma"))), 8)
#endif

static void pw_plain(const float *x, const float *w, const float *bias, const pw_add *ad,
                     float *out, Py_ssize_t p0, Py_ssize_t pixels, Py_ssize_t cin,
                     Py_ssize_t cout)
{
    pw_pos pos = ad ? pw_seek(ad, p0) : (pw_pos){0, 0, 0};
    for (Py_ssize_t p = p0; p < pixels; p++) {
        Py_ssize_t item = 0, lrow = -1;
        if (ad)
            pw_rows(ad, &pos, 1, &item, &lrow);
        const float *lo = ad && ad->low ? ad->low + lrow * cout : NULL;
        const float *ps = ad && ad->words ? ad->psub + item * ad->psub_bstride : NULL;
        for (Py_ssize_t oc = 0; oc < cout; oc++) {
            float acc = 0.0f;
            for (Py_ssize_t ic = 0; ic < cin; ic++)
                acc = fmaf(x[p * cin + ic], w[ic * cout + oc], acc);
            float y = bias ? acc + bias[oc] : acc;
            y = lo ? lo[oc] + y : y;
            out[p * cout + oc] = y;
            if (ps) {
                const float d = y - ps[oc];
                ad->words[p * ad->wd + oc / 32] |= (uint32_t)(d < 0.0f) << (oc % 32);
            }
        }
    }
}

/* pixels [p0, p1) */
typedef void (*pw_fn)(const float *, const float *, const float *, const pw_add *, float *,
                      Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t);

typedef struct {
    pw_fn fn;
    const float *x, *w, *bias;
    const pw_add *ad;
    float *out;
    Py_ssize_t cin, cout;
} pw_job;

static void pw_range(void *ctx, Py_ssize_t lo, Py_ssize_t hi)
{
    const pw_job *j = ctx;
    if (j->ad && j->ad->words && j->fn == pw_plain) /* bits are or-ed in per channel */
        memset(j->ad->words + lo * j->ad->wd, 0, sizeof(uint32_t) * (size_t)((hi - lo) * j->ad->wd));
    j->fn(j->x, j->w, j->bias, j->ad, j->out, lo, hi, j->cin, j->cout);
}

/* The kernel of the default kernel path (set_path) for cout: the vector kernels need cout a
 * multiple of their lanes and FMA (every AVX-512 / AVX2 CPU we know has it; checked). */
static pw_fn pick_pw(Py_ssize_t cout)
{
    (void)cout; /* (portable builds) */
#if HIDIFF_X86 && defined(__GNUC__)
    __builtin_cpu_init();
    const char *path = default_path_name();
    const int fma = __builtin_cpu_supports("fma");
    if (fma && strcmp(path, "avx512") == 0 && cout % 16 == 0)
        return pw_avx512;
    if (fma && (strcmp(path, "avx512") == 0 || strcmp(path, "avx2") == 0) && cout % 8 == 0)
        return pw_avx2;
#endif
    return pw_plain;
}

PyObject *py_pointwise(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *names[] = {"x", "w", "bias", "out", "threads", "add_up", "pack_sub", "words",
                            NULL};
    PyObject *x_obj, *w_obj, *b_obj = Py_None, *out_obj = Py_None, *a_obj = Py_None;
    PyObject *ps_obj = Py_None, *words_obj = Py_None, *words = NULL;
    int threads = 1, pb = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOiOOO", names, &x_obj, &w_obj, &b_obj,
                                     &out_obj, &threads, &a_obj, &ps_obj, &words_obj))
        return NULL;
    Py_buffer xv, wv, bv, ov, av, psv = {0}, wov = {0};
    int has_bias = b_obj != Py_None, has_add = 0;
    PyObject *result = NULL;
    if (get_buffer(x_obj, &xv, "x", 'f', 0) < 0)
        return NULL;
    if (get_buffer(w_obj, &wv, "w", 'f', 0) < 0) {
        PyBuffer_Release(&xv);
        return NULL;
    }
    if (has_bias && get_buffer(b_obj, &bv, "bias", 'f', 0) < 0) {
        has_bias = 0;
        goto done;
    }
    if (xv.ndim != 4 || wv.ndim != 2 || wv.shape[0] != xv.shape[3] ||
        (has_bias && bv.len / 4 != wv.shape[1])) {
        PyErr_SetString(PyExc_ValueError,
                        "x must be NHWC (N, H, W, Cin), w (Cin, Cout) and bias (Cout,)");
        goto done;
    }
    const Py_ssize_t shape[4] = {xv.shape[0], xv.shape[1], xv.shape[2], wv.shape[1]};
    if (a_obj != Py_None) {
        if (get_buffer(a_obj, &av, "add_up", 'f', 0) < 0)
            goto done;
        has_add = 1;
        if (av.ndim != 4 || shape[1] % 2 || shape[2] % 2 || av.shape[0] != shape[0] ||
            av.shape[1] != shape[1] / 2 || av.shape[2] != shape[2] / 2 || av.shape[3] != shape[3]) {
            PyErr_SetString(PyExc_ValueError, "add_up must be NHWC (N, H / 2, W / 2, Cout) "
                                              "for an even H and W");
            goto done;
        }
    }
    if (ps_obj == Py_None && words_obj != Py_None) {
        PyErr_SetString(PyExc_ValueError, "words needs pack_sub");
        goto done;
    }
    if (opt_channels(ps_obj, &psv, "pack_sub", shape[0], shape[3], &pb) < 0)
        goto done;
    if (psv.obj) {
        const Py_ssize_t wshape[4] = {shape[0], shape[1], shape[2], (shape[3] + 31) / 32};
        words = output(words_obj, &wov, 4, wshape, 'i');
        if (!words)
            goto done;
    }
    result = output(out_obj, &ov, 4, shape, 'f');
    if (!result)
        goto done;
    if ((const char *)ov.buf < (const char *)xv.buf + xv.len &&
        (const char *)xv.buf < (const char *)ov.buf + ov.len) { /* rows are read after writes */
        PyErr_SetString(PyExc_ValueError, "out must not overlap x");
        PyBuffer_Release(&ov);
        Py_CLEAR(result);
        goto done;
    }
    if (has_add && (const char *)ov.buf < (const char *)av.buf + av.len &&
        (const char *)av.buf < (const char *)ov.buf + ov.len) {
        PyErr_SetString(PyExc_ValueError, "out must not overlap add_up");
        PyBuffer_Release(&ov);
        Py_CLEAR(result);
        goto done;
    }
    {
        const pw_add ad = {has_add ? (const float *)av.buf : NULL, shape[1], shape[2],
                           psv.obj ? (const float *)psv.buf : NULL, pb,
                           wov.obj ? (uint32_t *)wov.buf : NULL, (shape[3] + 31) / 32};
        const pw_job job = {pick_pw(shape[3]), (const float *)xv.buf, (const float *)wv.buf,
                            has_bias ? (const float *)bv.buf : NULL,
                            has_add || psv.obj ? &ad : NULL,
                            (float *)ov.buf, xv.shape[3], shape[3]};
        const Py_ssize_t pixels = shape[0] * shape[1] * shape[2];
        Py_BEGIN_ALLOW_THREADS
        /* a chunk of at least ~1 M multiply-adds per thread (~25 us; handing a chunk to a
         * waiting worker costs a few us, parallel.c) */
        const Py_ssize_t grain = ((Py_ssize_t)1 << 20) / (xv.shape[3] * shape[3] + 1) + 1;
        run_parallel(threads, pixels, PW_PIX, grain, pw_range, (void *)&job);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&ov);
done:
    if (wov.obj)
        PyBuffer_Release(&wov);
    if (psv.obj)
        PyBuffer_Release(&psv);
    if (words) {
        PyObject *pair = result ? PyTuple_Pack(2, result, words) : NULL;
        Py_DECREF(words);
        Py_XDECREF(result);
        result = pair;
    }
    if (has_add)
        PyBuffer_Release(&av);
    if (has_bias)
        PyBuffer_Release(&bv);
    PyBuffer_Release(&wv);
    PyBuffer_Release(&xv);
    return result;
}
