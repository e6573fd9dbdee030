/* Fused elementwise chains of the packed backend: several float32 ONNX elementwise ops on one
 * NHWC feature map in one pass (ew_chain).
 *
 *     v = x[i];  for each step k:  v = op_k(v, operand_k[i])
 *
 * op: 'a' v + o, 's' v - o, 'r' o - v, 'm' v * o, 'p' (v < 0 ? v * o : v) (PReLU, o the
 * slope); operand: a full array like x, one batch item of it (shared by the items: the chains
 * of one image), one value per channel (shared or per batch item) or a scalar.  Each step is one IEEE float32 operation in the graph's order (the build keeps
 * -ffp-contract=off: no FMA), so the result equals the ops one by one bit for bit.  The map is
 * processed in chunks of whole pixels kept in a stack buffer (L1): x, the full operands and out
 * are each read or written once, and out may be x or any full operand (each chunk is read
 * completely before it is written).  Compiled per target (AVX-512, AVX2, baseline) and picked
 * by CPU features.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "glue.h"

#define MAX_STEPS 16
#define CHUNK 2048 /* floats per chunk (8 KiB) */

enum { FULL = 0, CHANNEL = 1, SCALAR = 2, ITEM = 3 };

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

#define DEFINE_CHAIN(NAME, ATTR)                                                               \
    ATTR static void NAME(const float *x, float *out, Py_ssize_t n, Py_ssize_t per_item,       \
                          Py_ssize_t c, const chain_step *steps, int nsteps)                   \
    {                                                                                          \
        float buf[CHUNK];                                                                      \
        const Py_ssize_t span = c <= CHUNK ? (CHUNK / c) * c : c;                              \
        for (Py_ssize_t b = 0; b < n; b++)                                                     \
            for (Py_ssize_t at = 0; at < per_item; at += span) {                               \
                const Py_ssize_t len = per_item - at < span ? per_item - at : span;            \
                const Py_ssize_t base = b * per_item + at;                                     \
                memcpy(buf, x + base, sizeof(float) * (size_t)len);                            \
                for (int k = 0; k < nsteps; k++) {                                             \
                    const chain_step *s = &steps[k];                                           \
                    switch (s->op) {                                                           \
                    case 'a': CHAIN_OP(v + w); break;                                          \
                    case 's': CHAIN_OP(v - w); break;                                          \
                    case 'r': CHAIN_OP(w - v); break;                                          \
                    case 'm': CHAIN_OP(v * w); break;                                          \
                    default: {                                                                 \
                        /* 'p': the product computed always, a branch-free select */           \
                        CHAIN_OP(v < 0.0f ? v * w : v);                                        \
                        break;                                                                 \
                    }                                                                          \
                    }                                                                          \
                }                                                                              \
                memcpy(out + base, buf, sizeof(float) * (size_t)len);                          \
            }                                                                                  \
    }

/* The same with the running value in registers: VEC floats at a time, each step applied while
 * they are loaded; for C a multiple of VEC (every per-channel operand then lines up). */
#define VEC 16
typedef float vecf __attribute__((vector_size(VEC * 4)));
typedef int32_t veci __attribute__((vector_size(VEC * 4)));

#define VLOAD(p) ({ vecf v_; memcpy(&v_, (p), sizeof v_); v_; })
#define DEFINE_CHAIN_VEC(NAME, ATTR)                                                           \
    ATTR static void NAME(const float *x, float *out, Py_ssize_t n, Py_ssize_t per_item,       \
                          Py_ssize_t c, const chain_step *steps, int nsteps)                   \
    {                                                                                          \
        for (Py_ssize_t b = 0; b < n; b++)                                                     \
            for (Py_ssize_t i = 0; i < per_item; i += VEC) {                                   \
                const Py_ssize_t at = b * per_item + i, j = i % c;                             \
                vecf v = VLOAD(x + at);                                                        \
                for (int k = 0; k < nsteps; k++) {                                             \
                    const chain_step *s = &steps[k];                                           \
                    const vecf w = s->kind == FULL      ? VLOAD(s->p + at)                     \
                                   : s->kind == ITEM    ? VLOAD(s->p + i)                      \
                                   : s->kind == CHANNEL ? VLOAD(s->p + b * s->bstride + j)     \
                                                        : (vecf){0} + s->p[0];                 \
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
                memcpy(out + at, &v, sizeof v);                                                \
            }                                                                                  \
    }

#if HIDIFF_X86 && defined(__GNUC__)
DEFINE_CHAIN(chain_avx512, __attribute__((target("avx512f"))))
DEFINE_CHAIN(chain_avx2, __attribute__((target("avx2"))))
DEFINE_CHAIN_VEC(chain_vec_avx512, __attribute__((target("avx512f"))))
DEFINE_CHAIN_VEC(chain_vec_avx2, __attribute__((target("avx2"))))
#endif
DEFINE_CHAIN(chain_base, )
DEFINE_CHAIN_VEC(chain_vec_base, )

typedef void (*chain_fn)(const float *, float *, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                         const chain_step *, int);

static chain_fn pick_chain(int vec)
{
#if HIDIFF_X86 && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        return vec ? chain_vec_avx512 : chain_avx512;
    if (__builtin_cpu_supports("avx2"))
        return vec ? chain_vec_avx2 : chain_avx2;
#endif
    return vec ? chain_vec_base : chain_base;
}

PyObject *py_ew_chain(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    static char *names[] = {"x", "ops", "operands", "out", NULL};
    PyObject *x_obj, *operands, *out_obj = Py_None;
    const char *ops;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OyO|O", names, &x_obj, &ops, &operands, &out_obj))
        return NULL;
    const int nsteps = (int)strlen(ops);
    if (!PyTuple_Check(operands) || PyTuple_GET_SIZE(operands) != nsteps) {
        PyErr_SetString(PyExc_ValueError, "operands must be a tuple with one array per op");
        return NULL;
    }
    if (nsteps < 1 || nsteps > MAX_STEPS) {
        PyErr_Format(PyExc_ValueError, "a chain has 1 to %d ops (got %d)", MAX_STEPS, nsteps);
        return NULL;
    }
    Py_buffer xv, ov[MAX_STEPS], outv;
    int held = 0;
    PyObject *result = NULL;
    if (get_buffer(x_obj, &xv, "x", 'f', 0) < 0)
        return NULL;
    chain_step steps[MAX_STEPS];
    const Py_ssize_t size = xv.len / 4;
    const Py_ssize_t n = xv.ndim >= 2 ? xv.shape[0] : 1;
    const Py_ssize_t c = xv.ndim >= 1 ? xv.shape[xv.ndim - 1] : 1;
    if (c < 1 || c > CHUNK || size % n) {
        PyErr_Format(PyExc_ValueError, "x must be (N, ..., C) with 1 <= C <= %d", CHUNK);
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
                         "operand %d has %zd values: x's size %zd, one item's, C = %zd, N * C or 1 allowed",
                         held, len, size, c);
            PyBuffer_Release(&ov[held]);
            goto done;
        }
    }
    result = output(out_obj, &outv, xv.ndim, xv.shape, 'f');
    if (!result)
        goto done;
    {
        static chain_fn fns[2] = {NULL, NULL};
        const int vec = c % VEC == 0;
        if (!fns[vec])
            fns[vec] = pick_chain(vec);
        const chain_fn fn = fns[vec];
        Py_BEGIN_ALLOW_THREADS
        fn((const float *)xv.buf, (float *)outv.buf, n, size / n, c, steps, nsteps);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&outv);
done:
    for (int k = 0; k < held; k++)
        PyBuffer_Release(&ov[k]);
    PyBuffer_Release(&xv);
    return result;
}
