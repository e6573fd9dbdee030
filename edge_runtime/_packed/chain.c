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
 * does no arithmetic.  With a table start, a second lookup chain (chain_start.sub) may run in
 * the same pass: u = table2[idx], then its own steps; u is the operand of the steps of kind SUB
 * (the sum of another lookup of y_t that nothing else reads, never stored).
 * op: 'a' v + o, 's' v - o, 'r' o - v, 'm' v * o, 'p' (v < 0 ? v * o : v) (PReLU, o the
 * slope); operand: a full array like the result, one batch item of it (shared by the items: the
 * chains of one image), one value per channel (shared or per batch item) or a scalar.  Each step
 * is one IEEE float32 operation in the graph's order (the build keeps -ffp-contract=off: no
 * FMA), so the result equals the ops one by one bit for bit.  With C a multiple of 16 the
 * running value stays in registers; otherwise the map goes in chunks of whole pixels through a
 * stack buffer.  Either way every input is read once and out written once, and out may be x or
 * any full operand (each element or chunk is read completely before it is written).  With an
 * operand shared by the batch items (ITEM) the pass goes tile by tile, each tile through every
 * item, so the shared values are read once per tile.  Compiled per target (AVX-512, AVX2,
 * baseline); the one of the default kernel path (set_path) runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "chain.h"

#if HIDIFF_X86 && defined(__GNUC__)
#include <immintrin.h>
#endif

#define CHAIN_OP(BUF, EXPR)                                                                    \
    do {                                                                                       \
        if (s->kind == FULL || s->kind == ITEM || s->kind == SUB) {                            \
            const float *restrict o = s->kind == SUB    ? sub_buf                              \
                                      : s->kind == FULL ? s->p + base                          \
                                                        : s->p + at;                           \
            for (Py_ssize_t i = 0; i < len; i++) {                                             \
                const float v = BUF[i], w = o[i];                                              \
                BUF[i] = EXPR;                                                                 \
            }                                                                                  \
        } else if (s->kind == CHANNEL) {                                                       \
            const float *restrict o = s->p + b * s->bstride;                                   \
            for (Py_ssize_t q = 0; q < len; q += c)                                            \
                for (Py_ssize_t j = 0; j < c; j++) {                                           \
                    const float v = BUF[q + j], w = o[j];                                      \
                    BUF[q + j] = EXPR;                                                         \
                }                                                                              \
        } else {                                                                               \
            const float w = s->p[0];                                                           \
            for (Py_ssize_t i = 0; i < len; i++) {                                             \
                const float v = BUF[i];                                                        \
                BUF[i] = EXPR;                                                                 \
            }                                                                                  \
        }                                                                                      \
    } while (0)

/* Steps [0, NSTEPS) of STEPS applied to the chunk BUF. */
#define CHAIN_STEPS(BUF, STEPS, NSTEPS)                                                        \
    for (int k = 0; k < (NSTEPS); k++) {                                                       \
        const chain_step *s = &(STEPS)[k];                                                     \
        switch (s->op) {                                                                       \
        case 'a': CHAIN_OP(BUF, v + w); break;                                                 \
        case 's': CHAIN_OP(BUF, v - w); break;                                                 \
        case 'r': CHAIN_OP(BUF, w - v); break;                                                 \
        case 'm': CHAIN_OP(BUF, v * w); break;                                                 \
        default: {                                                                             \
            /* 'p': the product computed always, a branch-free select */                       \
            CHAIN_OP(BUF, v < 0.0f ? v * w : v);                                               \
            break;                                                                             \
        }                                                                                      \
        }                                                                                      \
    }

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
        float buf[CHUNK], sub_buf[CHUNK];                                                      \
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
            if (st->table2) { /* the second lookup chain, the operand of the SUB steps */      \
                const uint32_t *ix = st->idx + base / c;                                       \
                for (Py_ssize_t q = 0; q < len; q += c, ix++)                                  \
                    memcpy(sub_buf + q, st->table2 + (size_t)*ix * (size_t)c,                  \
                           sizeof(float) * (size_t)c);                                         \
                CHAIN_STEPS(sub_buf, st->sub, st->nsub)                                        \
            }                                                                                  \
            CHAIN_STEPS(buf, steps, nsteps)                                                    \
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

/* The same with the running values in registers: NBLK vectors of VEC floats at a time, each
 * step decoded once for them and applied while its operand is loaded (decoding a step per
 * vector cost about 8 cycles a step: 1.73 -> 1.36 ms for the cpu-base stem pass); for C a
 * multiple of VEC (every per-channel operand then lines up).  A scalar operand is broadcast as
 * s - (+0), which is s for every s (0 + s would turn -0 into +0). */
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
/* V[q] = op(V[q], W) for the block's nb vectors, one loop per op. */
#define BLOCK_OP(OP, V, W)                                                                     \
    do {                                                                                       \
        switch (OP) {                                                                          \
        case 'a': for (int q = 0; q < nb; q++) V[q] = V[q] + (W); break;                       \
        case 's': for (int q = 0; q < nb; q++) V[q] = V[q] - (W); break;                       \
        case 'r': for (int q = 0; q < nb; q++) V[q] = (W) - V[q]; break;                       \
        case 'm': for (int q = 0; q < nb; q++) V[q] = V[q] * (W); break;                       \
        default:                                                                               \
            for (int q = 0; q < nb; q++) {                                                     \
                const vecf neg = V[q] * (W);                                                   \
                const veci m = V[q] < (vecf){0};                                               \
                V[q] = (vecf)(((veci)neg & m) | ((veci)V[q] & ~m));                            \
            }                                                                                  \
        }                                                                                      \
    } while (0)

/* Step S over the block: vector q is element at0 + VEC q of the result (item-relative
 * i0b + VEC q, channel jq[q]); U: the SUB steps' operand. */
#define BLOCK_STEP(V, S, U)                                                                    \
    do {                                                                                       \
        const chain_step *s_ = (S);                                                            \
        if (s_->kind == FULL) {                                                                \
            const float *o_ = s_->p + at0;                                                     \
            BLOCK_OP(s_->op, V, VLOAD(o_ + VEC * q));                                          \
        } else if (s_->kind == ITEM) {                                                         \
            const float *o_ = s_->p + i0b;                                                     \
            BLOCK_OP(s_->op, V, VLOAD(o_ + VEC * q));                                          \
        } else if (s_->kind == CHANNEL) {                                                      \
            const float *o_ = s_->p + b * s_->bstride;                                         \
            BLOCK_OP(s_->op, V, VLOAD(o_ + jq[q]));                                            \
        } else if (s_->kind == SUB) {                                                          \
            BLOCK_OP(s_->op, V, U[q]);                                                         \
        } else {                                                                               \
            const vecf w_ = s_->p[0] - (vecf){0};                                              \
            BLOCK_OP(s_->op, V, w_);                                                           \
        }                                                                                      \
    } while (0)

/* NB vectors of the result from element at0 (item-relative i0b; the next vector's pixel pix
 * and channel j): each step is decoded once for them, then applied to each (NB a constant: the
 * vectors stay in registers). */
#define CHAIN_BLOCK(NB, BITS)                                                                  \
    do {                                                                                       \
        const int nb = (NB);                                                                   \
        const Py_ssize_t at0 = base0 + i0b;                                                    \
        Py_ssize_t pq[NB], jq[NB];                                                             \
        vecf v[NB], u[NB];                                                                     \
        for (int q = 0; q < nb; q++) {                                                         \
            pq[q] = pix, jq[q] = j;                                                            \
            v[q] = st->table ? VLOAD(st->table + (size_t)st->idx[pix] * (size_t)c + j)         \
                             : VLOAD(st->x + at0 + VEC * q);                                   \
            u[q] = st->table2 ? VLOAD(st->table2 + (size_t)st->idx[pix] * (size_t)c + j)       \
                              : (vecf){0};                                                     \
            j += VEC;                                                                          \
            if (j == c)                                                                        \
                j = 0, pix++;                                                                  \
        }                                                                                      \
        for (int k = 0; k < st->nsub; k++)                                                     \
            BLOCK_STEP(u, &st->sub[k], u);                                                     \
        for (int k = 0; k < nsteps; k++)                                                       \
            BLOCK_STEP(v, &steps[k], u);                                                       \
        for (int q = 0; q < nb; q++) {                                                         \
            if (st->words) { /* 16 sign bits: half a word */                                   \
                const vecf dv = v[q] - VLOAD(st->psub + b * st->psub_bstride + jq[q]);         \
                st->words[(size_t)pq[q] * (size_t)st->wd + (size_t)(jq[q] / 32)] |=            \
                    BITS(dv) << (jq[q] % 32);                                                  \
            }                                                                                  \
            memcpy(out + at0 + VEC * q, &v[q], sizeof v[q]);                                   \
        }                                                                                      \
        i0b += (NB) * VEC;                                                                     \
    } while (0)

#define NBLK 4
#define DEFINE_CHAIN_VEC(NAME, ATTR, BITS)                                                      \
    ATTR static void NAME(const chain_start *st, float *out, Py_ssize_t per_item, Py_ssize_t c,\
                          const chain_step *steps, int nsteps, Py_ssize_t e0, Py_ssize_t e1)   \
    {                                                                                          \
        FOR_ITEMS(Py_ssize_t pix = (base0 + i0) / c; /* pixel counter: no division below */    \
                  Py_ssize_t j = 0; /* channel of the next vector (i0 starts a pixel) */       \
                  Py_ssize_t i0b = i0;                                                         \
                  while (i1 - i0b >= NBLK * VEC) CHAIN_BLOCK(NBLK, BITS);                      \
                  while (i0b < i1) CHAIN_BLOCK(1, BITS))                                       \
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
    Py_ssize_t n, tile; /* tile > 0: position-major order (chain_tiles) */
} chain_job;

static void chain_range(void *ctx, Py_ssize_t lo, Py_ssize_t hi)
{
    const chain_job *j = ctx;
    j->fn(j->st, j->out, j->per_item, j->c, j->steps, j->nsteps, lo, hi);
}

/* [lo, hi) are positions inside an item: each tile of them for every item in turn, so that
 * the operands one item shares with all (ITEM: the per-image values of a batch of chains) are
 * read from memory once per tile, not once per item. */
static void chain_tiles(void *ctx, Py_ssize_t lo, Py_ssize_t hi)
{
    const chain_job *j = ctx;
    for (Py_ssize_t t0 = lo; t0 < hi; t0 += j->tile) {
        const Py_ssize_t t1 = hi - t0 < j->tile ? hi : t0 + j->tile;
        for (Py_ssize_t b = 0; b < j->n; b++)
            j->fn(j->st, j->out, j->per_item, j->c, j->steps, j->nsteps, b * j->per_item + t0,
                  b * j->per_item + t1);
    }
}

static int has_item(const chain_step *steps, int nsteps)
{
    for (int k = 0; k < nsteps; k++)
        if (steps[k].kind == ITEM)
            return 1;
    return 0;
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

void chain_run(const chain_start *st, float *out, Py_ssize_t size, Py_ssize_t n, Py_ssize_t c,
               const chain_step *steps, int nsteps, int threads)
{
    const Py_ssize_t per_item = size / n;
    const int tiles =
        n > 1 && (has_item(steps, nsteps) || (st->sub && has_item(st->sub, st->nsub)));
    /* tiles of about 16 KiB of each map, whole pixels */
    const Py_ssize_t tile = tiles ? (4096 / c > 0 ? 4096 / c : 1) * c : 0;
    const chain_job job = {pick_chain(c % VEC == 0), st, out, per_item, c, steps, nsteps, n, tile};
    if (tiles)
        run_parallel(threads, per_item, c, (1 << 16) / n + 1, chain_tiles, (void *)&job);
    else
        run_parallel(threads, size, c, 1 << 16, chain_range, (void *)&job);
}
