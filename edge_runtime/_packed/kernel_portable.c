/* Portable path: no target attributes, GCC/Clang vector extensions of 128 bits (SSE2 on any
 * x86-64, NEON on aarch64), 16 output channels per vector of bytes.
 *
 * Baseline x86-64 has no popcount instruction (and a SWAR popcount costs ~12 operations per
 * vector), so this path looks popcounts up: the prepared weights hold, for every patch word,
 * nibble position n (0..7) and nibble value v, the 16-byte row popcount(v XOR nibble n of w[c])
 * over a group of 16 channels (LAYOUT_LUT).  One patch word of a pixel then costs 8 row loads +
 * 8 byte adds per 16 channels, the nibbles being extracted from the input word with scalar shifts.
 * Rows hold at most 4, so 7 words add up to at most 224 per byte before the byte counts are
 * widened into 32-bit lanes.  Row byte 4*i + j holds channel 4*j + i, so that byte j of the 32-bit
 * lanes is the contiguous channels 4j..4j+3.  The patch words are processed in chunks whose
 * tables fit in L1, with the partial sums per pixel kept in the row's scratch buffer.
 */
#include <string.h>

#include "kernels.h"

#define INL static inline __attribute__((always_inline))
#define L 16
#define PMAX 3
#define FLUSH_EVERY 7
#define CHUNK 18 /* patch words per pass: 18 * 2 KiB of tables stay in L1 */

typedef uint8_t vu8 __attribute__((vector_size(16)));
typedef uint32_t vu32 __attribute__((vector_size(16)));
typedef int32_t vi32 __attribute__((vector_size(16)));
typedef float vf32 __attribute__((vector_size(16)));

INL void flush(vu32 acc[4], vu8 *bytes)
{
    const vu32 b = (vu32)*bytes;
    const vu32 m = {0xFF, 0xFF, 0xFF, 0xFF};
    acc[0] += b & m;
    acc[1] += (b >> 8) & m;
    acc[2] += (b >> 16) & m;
    acc[3] += b >> 24;
    *bytes = (vu8){0};
}

/* Pixels ow..ow+P-1, channel group cg, patch words [t0, t1).  The first pass starts from 0, later
 * ones from the partial sums in r->scratch; the last pass applies the epilogue. */
INL void block(const conv_desc *d, const conv_row *r, int ow, int cg, int t0, int t1, int first,
               int last, const int P)
{
    vu8 accb[PMAX];
    vu32 acc[PMAX][4];
    for (int p = 0; p < P; p++) {
        accb[p] = (vu8){0};
        for (int q = 0; q < 4; q++)
            acc[p][q] = (vu32){0};
        if (!first)
            memcpy(acc[p], r->scratch + (size_t)(ow + p) * L, sizeof acc[p]);
    }
    const uint8_t *tb = (const uint8_t *)d->w + ((size_t)cg * d->tw + t0) * 128 * L;
    const uint32_t *xb = r->x + (size_t)ow * d->step;
    const int step = d->step;
    int pending = 0;
    for (int t = t0; t < t1; t++, tb += 128 * L) {
        const int32_t xoff = d->tw_off[t];
        for (int p = 0; p < P; p++) {
            const uint32_t word = xb[p * step + xoff];
            uint32_t off[8];
            for (int n = 0; n < 8; n++) /* row (n, v) lies at byte 256 * n + 16 * v */
                off[n] = 256u * n + ((n ? word >> (4 * n - 4) : word << 4) & 0xF0u);
#define ROW(n) (*(const vu8 *)(tb + off[n]))
            accb[p] += ((ROW(0) + ROW(1)) + (ROW(2) + ROW(3))) +
                       ((ROW(4) + ROW(5)) + (ROW(6) + ROW(7)));
#undef ROW
        }
        if (++pending == FLUSH_EVERY) {
            for (int p = 0; p < P; p++)
                flush(acc[p], &accb[p]);
            pending = 0;
        }
    }
    for (int p = 0; p < P; p++)
        flush(acc[p], &accb[p]);
    if (!last) {
        for (int p = 0; p < P; p++)
            memcpy(r->scratch + (size_t)(ow + p) * L, acc[p], sizeof acc[p]);
        return;
    }

    for (int q = 0; q < 4; q++) {
        const int c0 = cg * L + 4 * q;
        if (c0 >= d->cout)
            break;
        const int left = d->cout - c0 < 4 ? d->cout - c0 : 4;
        vf32 sc, bi, th = {0, 0, 0, 0};
        memcpy(&sc, d->scale + c0, sizeof sc);
        memcpy(&bi, d->bias + c0, sizeof bi);
        if (d->thr)
            memcpy(&th, d->thr + c0, sizeof th);
        for (int p = 0; p < P; p++) {
            vi32 a = (vi32)acc[p][q];
            if (r->corr) {
                vi32 c;
                memcpy(&c, r->corr + (size_t)(ow + p) * d->cpad + c0, sizeof c);
                a -= c;
            }
            const int32_t kv = r->kval[ow + p];
            const vi32 yi = (vi32){kv, kv, kv, kv} - a * 2;
            const vf32 y = __builtin_convertvector(yi, vf32) * sc + bi;
            if (d->thr) {
                const vi32 m = (y < th) & (vi32){1, 2, 4, 8};
                const unsigned bits =
                    (unsigned)((m[0] | m[1]) | (m[2] | m[3])) & ((1u << left) - 1u);
                uint32_t *o = (uint32_t *)r->out + (size_t)(ow + p) * d->out_words;
                o[c0 / 32] |= (uint32_t)bits << (c0 % 32);
            } else {
                float *o = (float *)r->out + (size_t)(ow + p) * d->cout + c0;
                if (left == 4)
                    memcpy(o, &y, sizeof y);
                else
                    for (int l = 0; l < left; l++)
                        o[l] = y[l];
            }
        }
    }
}

static void blk_p(const conv_desc *d, const conv_row *r, int ow, int cg, int t0, int t1,
                  int first, int last)
{
    block(d, r, ow, cg, t0, t1, first, last, PMAX);
}

static void blk_1(const conv_desc *d, const conv_row *r, int ow, int cg, int t0, int t1,
                  int first, int last)
{
    block(d, r, ow, cg, t0, t1, first, last, 1);
}

void row_portable(const conv_desc *d, const conv_row *r)
{
    for (int cg = r->v0; cg < r->v1; cg++)
        for (int t0 = 0; t0 < d->tw; t0 += CHUNK) {
            const int t1 = d->tw - t0 < CHUNK ? d->tw : t0 + CHUNK;
            int ow = 0;
            for (; ow + PMAX <= d->wo; ow += PMAX)
                blk_p(d, r, ow, cg, t0, t1, t0 == 0, t1 == d->tw);
            for (; ow < d->wo; ow++)
                blk_1(d, r, ow, cg, t0, t1, t0 == 0, t1 == d->tw);
        }
}

void pack_portable(const float *x, uint32_t *out, size_t rows, int c, const float *sub)
{
    const int wd = (c + 31) / 32;
    for (size_t i = 0; i < rows; i++) {
        const float *xr = x + i * (size_t)c;
        uint32_t *o = out + i * (size_t)wd;
        for (int w = 0; w < wd; w++) {
            const int nb = c - 32 * w < 32 ? c - 32 * w : 32;
            uint32_t word = 0;
            if (sub) {
                for (int b = 0; b < nb; b++) {
                    const float v = xr[32 * w + b] - sub[32 * w + b]; /* float32 Sub, then sign */
                    word |= (uint32_t)(v < 0.0f) << b;
                }
            } else {
                for (int b = 0; b < nb; b++)
                    word |= (uint32_t)(xr[32 * w + b] < 0.0f) << b;
            }
            o[w] = word;
        }
    }
}

HIDIFF_DEFINE_PACK_NCHW(pack_nchw_portable, )
HIDIFF_DEFINE_EPILOGUE(epilogue_portable, )
