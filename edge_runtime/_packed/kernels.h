/* Shared declarations of the packed XNOR-popcount binary convolution kernels.
 *
 * Packed format (LCE): the channel axis of an NHWC tensor is packed into 32-bit words, channel c
 * -> word c / 32, bit c % 32 (LSB first); bit 1 means -1 (x < 0), bit 0 means +1; unused bits of
 * the last word are 0.  Weights are OHWI packed the same way along I.
 *
 * The driver (driver.c) pads the packed input spatially with the word 0 (+1 channels), uses the
 * weights prepared for the path (layouts below; channels beyond cout are padding) and hands the
 * path one output row at a time.
 * A path computes, for every output pixel p of the row and channel c,
 *
 *     acc   = sum over the patch words of popcount(x_word XOR w_word)
 *     yint  = kval[p] - 2 * (acc - corr[p][c])        (corr only for pad_value 0, else NULL)
 *     y     = (float)yint * scale[c] + bias[c]         (two roundings: no FMA contraction)
 *
 * and stores y (float NHWC) or, with packed output, the bit (y < thr[c]) into packed NHWC words.
 */
#ifndef HIDIFF_PACKED_KERNELS_H
#define HIDIFF_PACKED_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifndef HIDIFF_X86 /* -DHIDIFF_X86=0 builds the portable path alone, as on aarch64 */
#if defined(__x86_64__) || defined(_M_X64)
#define HIDIFF_X86 1
#else
#define HIDIFF_X86 0
#endif
#endif

typedef struct {
    int wd;                 /* input words per pixel */
    int cout;               /* output channels */
    int cpad;               /* cout rounded up to a multiple of the path's lanes */
    int wo;                 /* output pixels per row */
    int step;               /* words between the patches of consecutive output pixels */
    int tw;                 /* words per patch: kh * kw * wd */
    int nseg;               /* contiguous runs of patch words */
    const int32_t *seg_off; /* word offset of each run from the patch origin */
    const int32_t *seg_len; /* words in each run (the runs follow the weight word order) */
    const int32_t *tw_off;  /* [tw]: offset of each patch word from the patch origin */
    const void *w;          /* prepared weights, layout of the path (see prep_* below) */
    const float *scale;     /* [cpad] */
    const float *bias;      /* [cpad] */
    const float *thr;       /* [cpad] or NULL for float output */
    int out_words;          /* packed output words per pixel */
} conv_desc;

typedef struct {
    const uint32_t *x;    /* patch origin of the row's first output pixel */
    const int32_t *kval;  /* [wo]: number of non-padded taps * cin (or kh*kw*cin for pad +1) */
    const int32_t *corr;  /* [wo][cpad] popcount of the weights over padded taps, or NULL */
    int zero0, zero1;     /* output pixels [zero0, zero1) have corr all zero (paths may skip it) */
    void *out;            /* float [wo][cout] or uint32 [wo][out_words] (zeroed beforehand) */
    int32_t *scratch;     /* [wo][cpad] int32 the path may use */
    int v0, v1;           /* compute the channel vectors [v0, v1) (channels v * lanes ...) */
    /* With `fused` (paths whose path_desc has fuses_epilogue; float output only) the path also
     * applies the fused epilogue of bconv_args to each vector before storing it, in the same
     * float32 order: y = (((y + res) + zeta) < 0 ? . * slope : .) + gamma (absent stages
     * skipped), and writes the sign bits of y - pthr into pout; res may alias out (each vector
     * is read before it is written). */
    int fused;
    const float *res;     /* [wo][cout], the row's residual, or NULL */
    const float *zeta, *slope, *gamma, *pthr; /* [cout] (the batch item's), or NULL */
    uint32_t *pout;       /* [wo][ceil(cout / 32)] the row's sign words, or NULL */
} conv_row;

typedef void (*row_fn)(const conv_desc *d, const conv_row *r);

/* What the epilogue of a block of P pixels from `ow` reads of its row, taken once before any
 * store (the stores could alias conv_row as far as the compiler knows): the padding correction
 * where one of the pixels has one, and the fused stages (NULL when absent or not fused). */
typedef struct {
    const int32_t *corr, *kval;
    const float *thr, *res, *zeta, *slope, *gamma, *pthr;
    uint32_t *pout;
    void *out;
    int cout, out_words;
} block_epilogue;

static inline block_epilogue epilogue_of(const conv_desc *d, const conv_row *r, int ow, int P)
{
    const int f = r->fused;
    block_epilogue e = {r->corr && (ow < r->zero0 || ow + P > r->zero1) ? r->corr : NULL,
                        r->kval + ow, d->thr, f ? r->res : NULL, f ? r->zeta : NULL,
                        f ? r->slope : NULL, f ? r->gamma : NULL, NULL, f ? r->pout : NULL,
                        r->out, d->cout, d->out_words};
    e.pthr = e.pout ? r->pthr : NULL;
    return e;
}
/* Pack `rows` rows of `c` floats into rows of ceil(c / 32) words; with `sub` (c floats, else
 * NULL) the bit is (x[c] - sub[c]) < 0, the float32 subtraction rounded first (as ONNX Sub then
 * the sign). */
typedef void (*pack_fn)(const float *x, uint32_t *out, size_t rows, int c, const float *sub);
/* Pack NCHW float (n, c, hw) into NHWC words (n, hw, ceil(c / 32)). */
typedef void (*pack_nchw_fn)(const float *x, uint32_t *out, size_t n, int c, size_t hw);

/* The fused epilogue over channels [c0, c1) of `wo` pixels of a float row (stride cout floats per
 * pixel), in place in `io`; see bconv_args.  other: the same pixels of the other Add operand
 * (the residual, or the conv row when io is the residual), or NULL; zeta/slope/gamma: cout
 * floats (the batch item's), or NULL.  io and other never overlap. */
typedef void (*epilogue_fn)(float *io, const float *other, const float *zeta, const float *slope,
                            const float *gamma, int wo, int cout, int c0, int c1);

/* Weight layouts.  words: uint32 [cpad / lanes][tw][lanes] (the popcount paths).
 * lut: uint8 [cpad / lanes][tw][8][16][lanes], entry = popcount(v XOR nibble n of the word),
 * i.e. per output channel a 16-entry table for each of the 8 nibbles of every patch word (the
 * channels of a row are permuted, see kernel_portable.c). */
enum { LAYOUT_WORDS = 0, LAYOUT_LUT = 1 };

typedef struct {
    const char *name;
    row_fn row;
    pack_fn pack;
    pack_nchw_fn pack_nchw;
    epilogue_fn epilogue; /* NULL where the row function applies it (fuses_epilogue) */
    int lanes;
    int layout;
    int supported;
    int fuses_epilogue; /* the row function applies conv_row's fused epilogue itself */
} path_desc;

void row_portable(const conv_desc *d, const conv_row *r);
void pack_portable(const float *x, uint32_t *out, size_t rows, int c, const float *sub);
void pack_nchw_portable(const float *x, uint32_t *out, size_t n, int c, size_t hw);
void epilogue_portable(float *io, const float *other, const float *zeta, const float *slope,
                     const float *gamma, int wo, int cout, int c0, int c1);
#if HIDIFF_X86
void row_avx2(const conv_desc *d, const conv_row *r);
void pack_avx2(const float *x, uint32_t *out, size_t rows, int c, const float *sub);
void pack_nchw_avx2(const float *x, uint32_t *out, size_t n, int c, size_t hw);
void row_avx512(const conv_desc *d, const conv_row *r);
void pack_avx512(const float *x, uint32_t *out, size_t rows, int c, const float *sub);
void pack_nchw_avx512(const float *x, uint32_t *out, size_t n, int c, size_t hw);
#endif

/* Weights prepared for one path (driver.c). */
typedef struct {
    int path, cout, cin, kh, kw, wd, cpad, tw, lanes, layout;
    void *w;       /* layout of the path */
    int32_t *wpc;  /* [kh*kw][cpad] popcount of the weight words of each tap */
} prepared_t;

prepared_t *prepare_weights(const uint32_t *w, int cout, int cin, int kh, int kw, int path,
                            const path_desc *pd);
void free_prepared(prepared_t *p);

/* One binary convolution (driver.c): packed NHWC x (n, h, w, ceil(cin/32)), weights prepared from
 * packed OHWI words (cout, kh, kw, ceil(cin/32)) for the path of `row`; scale/bias/thr have cout
 * floats or are NULL (1, 0, float output).  out: float (n, ho, wo, cout) or, with thr, uint32
 * (n, ho, wo, ceil(cout/32)).  Call without the GIL.  Returns 0, or -1 when out of memory. */
typedef struct {
    const uint32_t *x;
    int n, h, w, cin;
    const prepared_t *prep;
    int cout, kh, kw;
    int sh, sw, ph, pw, dh, dw;
    int pad_zero;           /* 1: pad_value 0 (padded taps contribute 0), 0: pad_value +1 */
    const float *scale, *bias, *thr;
    void *out;
    int ho, wo;
    int threads;
    row_fn row;
    /* Optional fused epilogue on the float output (float output only), in this order, each
     * step one float32 operation as in the ONNX graph (ORT's order):
     *   y = y + res[pixel][c]            res: float NHWC like out, or NULL
     *   y = y + zeta[c]                  per-channel vectors: NULL, or [n][cout] floats read
     *   y = y < 0 ? y * slope[c] : y       with stride *_bstride per batch item (0: shared)
     *   y = y + gamma[c]
     * res may be out itself (the output takes the residual's buffer: a path without
     * fuses_epilogue then writes each row into a scratch row first); and optionally, once a
     * row is final, its sign words (y - pthr[c]) < 0 (pack_fn with sub) into pout, packed NHWC
     * (n, ho, wo, ceil(cout/32)); paths with fuses_epilogue apply all of it as they store. */
    const float *res, *zeta, *slope, *gamma, *pthr;
    int zeta_bstride, gamma_bstride, pthr_bstride;
    uint32_t *pout;
    pack_fn pack;
    epilogue_fn epilogue;
    int fuses_epilogue; /* the row function can apply the epilogue and packing (conv_row) */
} bconv_args;

int bconv_run(const bconv_args *a);

/* NCHW -> packed NHWC, written as plain loops so each target attribute auto-vectorises it over
 * blocks of pixels (the inner loop reads one channel's contiguous pixels). */
#define HIDIFF_PACK_NCHW_BLOCK 64
#define HIDIFF_DEFINE_PACK_NCHW(NAME, ATTR)                                                    \
    ATTR void NAME(const float *x, uint32_t *out, size_t n, int c, size_t hw)                  \
    {                                                                                          \
        const int wd = (c + 31) / 32;                                                          \
        for (size_t b = 0; b < n; b++) {                                                       \
            const float *xb = x + b * (size_t)c * hw;                                          \
            uint32_t *ob = out + b * hw * (size_t)wd;                                          \
            for (size_t p0 = 0; p0 < hw; p0 += HIDIFF_PACK_NCHW_BLOCK) {                       \
                const size_t np = hw - p0 < HIDIFF_PACK_NCHW_BLOCK ? hw - p0                   \
                                                                   : HIDIFF_PACK_NCHW_BLOCK;   \
                for (int w = 0; w < wd; w++) {                                                 \
                    uint32_t acc[HIDIFF_PACK_NCHW_BLOCK] = {0};                                \
                    const int nb = c - 32 * w < 32 ? c - 32 * w : 32;                          \
                    for (int bit = 0; bit < nb; bit++) {                                       \
                        const float *src = xb + (size_t)(32 * w + bit) * hw + p0;              \
                        for (size_t j = 0; j < np; j++)                                        \
                            acc[j] |= (uint32_t)(src[j] < 0.0f) << bit;                        \
                    }                                                                          \
                    for (size_t j = 0; j < np; j++)                                            \
                        ob[(p0 + j) * (size_t)wd + (size_t)w] = acc[j];                        \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }

/* The epilogue (see epilogue_fn), plain C compiled once per target attribute (the same IEEE
 * float32 operations in the same order on every path: each element is
 * ((((y + res) + zeta) < 0 ? . * slope : .) + gamma), absent stages skipped; y + res equals
 * res + y exactly).  In place (io = y, other = res or NULL) or, when the output takes the
 * residual's buffer, io = res with other = y (a scratch row).  The stage mask is dispatched to
 * loops the compiler specialises. */
#define HIDIFF_EPI_BODY(HAS_RES, HAS_Z, HAS_S, HAS_G)                                           \
    for (int p = 0; p < wo; p++) {                                                             \
        float *restrict yp = io + (size_t)p * (size_t)cout;                                    \
        const float *restrict rp = HAS_RES ? other + (size_t)p * (size_t)cout : NULL;          \
        for (int c = c0; c < c1; c++) {                                                        \
            float v = yp[c];                                                                   \
            if (HAS_RES)                                                                       \
                v = v + rp[c];                                                                 \
            if (HAS_Z)                                                                         \
                v = v + zeta[c];                                                               \
            if (HAS_S) {                                                                       \
                const float neg = v * slope[c]; /* computed always: a branch-free select */   \
                v = v < 0.0f ? neg : v;                                                        \
            }                                                                                  \
            if (HAS_G)                                                                         \
                v = v + gamma[c];                                                              \
            yp[c] = v;                                                                         \
        }                                                                                      \
    }
#define HIDIFF_EPI_CASE(M)                                                                     \
    case M:                                                                                    \
        HIDIFF_EPI_BODY((M) & 1, (M) & 2, (M) & 4, (M) & 8) break;
#define HIDIFF_DEFINE_EPILOGUE(NAME, ATTR)                                                     \
    ATTR void NAME(float *restrict io, const float *restrict other,                            \
                   const float *restrict zeta, const float *restrict slope,                    \
                   const float *restrict gamma, int wo, int cout, int c0, int c1)              \
    {                                                                                          \
        const int mask = (other != NULL) | (zeta != NULL) << 1 | (slope != NULL) << 2 |        \
                         (gamma != NULL) << 3;                                                 \
        switch (mask) {                                                                        \
            HIDIFF_EPI_CASE(1) HIDIFF_EPI_CASE(2) HIDIFF_EPI_CASE(3) HIDIFF_EPI_CASE(4)        \
            HIDIFF_EPI_CASE(5) HIDIFF_EPI_CASE(6) HIDIFF_EPI_CASE(7) HIDIFF_EPI_CASE(8)        \
            HIDIFF_EPI_CASE(9) HIDIFF_EPI_CASE(10) HIDIFF_EPI_CASE(11) HIDIFF_EPI_CASE(12)     \
            HIDIFF_EPI_CASE(13) HIDIFF_EPI_CASE(14) HIDIFF_EPI_CASE(15)                        \
        default:                                                                               \
            break;                                                                             \
        }                                                                                      \
    }

#endif
