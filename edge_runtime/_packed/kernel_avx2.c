/* AVX2 path: 8 output channels per ymm (32-bit lanes), nibble-LUT popcount (VPSHUFB).
 *
 * Per patch word the per-byte popcounts are added into byte accumulators (at most 8 per word, so
 * 31 words fit in a byte); every 31 words they are widened into 32-bit lanes with
 * VPMADDUBSW + VPMADDWD.  Blocking: P pixels x G channel vectors, as in the AVX-512 path.
 */
#include "kernels.h"

#if HIDIFF_X86
#include <immintrin.h>
#include <string.h>

#define T256 __attribute__((target("avx2")))
#define INL static inline __attribute__((always_inline))
#define L 8
#define PMAX 2
#define GMAX 4
#define FLUSH_EVERY 31

INL T256 __m256i widen(__m256i bytes)
{
    const __m256i pairs = _mm256_maddubs_epi16(bytes, _mm256_set1_epi8(1));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

INL T256 void block(const conv_desc *d, const conv_row *r, int ow, int cv0, const int P,
                    const int G)
{
    __m256i acc[PMAX][GMAX], accb[PMAX][GMAX];
    for (int p = 0; p < P; p++)
        for (int g = 0; g < G; g++)
            acc[p][g] = accb[p][g] = _mm256_setzero_si256();
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1,
                                         2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const size_t wstride = (size_t)d->tw * L;
    const uint32_t *wp = (const uint32_t *)d->w + (size_t)cv0 * wstride;
    const uint32_t *xb = r->x + (size_t)ow * d->step;
    const int step = d->step;
    int pending = 0;
    for (int s = 0; s < d->nseg; s++) {
        const uint32_t *xs = xb + d->seg_off[s];
        const int len = d->seg_len[s];
        for (int k = 0; k < len; k++) {
            for (int p = 0; p < P; p++) {
                const __m256i xv = _mm256_set1_epi32((int)xs[p * step + k]);
                for (int g = 0; g < G; g++) {
                    const __m256i w =
                        _mm256_loadu_si256((const __m256i *)(wp + g * wstride + (size_t)k * L));
                    const __m256i v = _mm256_xor_si256(xv, w);
                    const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low4));
                    const __m256i hi =
                        _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
                    accb[p][g] = _mm256_add_epi8(accb[p][g], _mm256_add_epi8(lo, hi));
                }
            }
            if (++pending == FLUSH_EVERY) {
                for (int p = 0; p < P; p++)
                    for (int g = 0; g < G; g++) {
                        acc[p][g] = _mm256_add_epi32(acc[p][g], widen(accb[p][g]));
                        accb[p][g] = _mm256_setzero_si256();
                    }
                pending = 0;
            }
        }
        wp += (size_t)len * L;
    }
    for (int p = 0; p < P; p++)
        for (int g = 0; g < G; g++)
            acc[p][g] = _mm256_add_epi32(acc[p][g], widen(accb[p][g]));

    /* The epilogue, one stage at a time over the block's P pixels, as in the AVX-512 path:
     * the row's pointers read once, before any store; channels past cout masked. */
    const block_epilogue e = epilogue_of(d, r, ow, P);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int g = 0; g < G; g++) {
        const int c0 = (cv0 + g) * L;
        const int left = e.cout - c0;
        const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lane);
        const unsigned vbits = left >= L ? 0xFFu : (1u << left) - 1u;
        const __m256 sc = _mm256_loadu_ps(d->scale + c0);
        const __m256 bi = _mm256_loadu_ps(d->bias + c0);
        __m256 v[PMAX];
        for (int p = 0; p < P; p++) {
            __m256i a = acc[p][g];
            if (e.corr)
                a = _mm256_sub_epi32(a, _mm256_loadu_si256((const __m256i *)(
                                            e.corr + (size_t)(ow + p) * d->cpad + c0)));
            const __m256i yi =
                _mm256_sub_epi32(_mm256_set1_epi32(e.kval[p]), _mm256_slli_epi32(a, 1));
            v[p] = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(yi), sc), bi);
        }
        if (e.thr) {
            const __m256 t = _mm256_loadu_ps(e.thr + c0);
            for (int p = 0; p < P; p++) {
                const uint8_t byte =
                    (uint8_t)((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v[p], t, _CMP_LT_OQ)) &
                              vbits);
                memcpy((char *)((uint32_t *)e.out + (size_t)(ow + p) * e.out_words) + c0 / 8,
                       &byte, 1);
            }
            continue;
        }
        /* the fused epilogue of kernels.h, one float32 op per stage */
        if (e.res)
            for (int p = 0; p < P; p++)
                v[p] = _mm256_add_ps(
                    v[p], _mm256_maskload_ps(e.res + (size_t)(ow + p) * e.cout + c0, valid));
        if (e.zeta) {
            const __m256 zeta = _mm256_maskload_ps(e.zeta + c0, valid);
            for (int p = 0; p < P; p++)
                v[p] = _mm256_add_ps(v[p], zeta);
        }
        if (e.slope) {
            const __m256 slope = _mm256_maskload_ps(e.slope + c0, valid);
            for (int p = 0; p < P; p++)
                v[p] = _mm256_blendv_ps(v[p], _mm256_mul_ps(v[p], slope),
                                        _mm256_cmp_ps(v[p], _mm256_setzero_ps(), _CMP_LT_OQ));
        }
        if (e.gamma) {
            const __m256 gamma = _mm256_maskload_ps(e.gamma + c0, valid);
            for (int p = 0; p < P; p++)
                v[p] = _mm256_add_ps(v[p], gamma);
        }
        if (e.pout) { /* the next layer's sign bits of v - pthr */
            const __m256 pthr =
                e.pthr ? _mm256_maskload_ps(e.pthr + c0, valid) : _mm256_setzero_ps();
            for (int p = 0; p < P; p++) {
                const __m256 dv = e.pthr ? _mm256_sub_ps(v[p], pthr) : v[p];
                const unsigned bits = (unsigned)_mm256_movemask_ps(
                                          _mm256_cmp_ps(dv, _mm256_setzero_ps(), _CMP_LT_OQ)) &
                                      vbits;
                e.pout[(size_t)(ow + p) * e.out_words + c0 / 32] |= (uint32_t)bits << (c0 % 32);
            }
        }
        for (int p = 0; p < P; p++) {
            float *o = (float *)e.out + (size_t)(ow + p) * e.cout + c0;
            if (left >= L)
                _mm256_storeu_ps(o, v[p]);
            else
                _mm256_maskstore_ps(o, valid, v[p]);
        }
    }
}

#define DEF(P, G)                                                                              \
    static T256 void blk_##P##_##G(const conv_desc *d, const conv_row *r, int ow, int cv0)     \
    {                                                                                          \
        block(d, r, ow, cv0, P, G);                                                            \
    }
DEF(2, 4) DEF(2, 3) DEF(2, 2) DEF(2, 1)
DEF(1, 4) DEF(1, 3) DEF(1, 2) DEF(1, 1)
#undef DEF

typedef void (*blk_fn)(const conv_desc *, const conv_row *, int, int);
static const blk_fn BLK_P[GMAX] = {blk_2_1, blk_2_2, blk_2_3, blk_2_4};
static const blk_fn BLK_1[GMAX] = {blk_1_1, blk_1_2, blk_1_3, blk_1_4};

T256 void row_avx2(const conv_desc *d, const conv_row *r)
{
    for (int cv = r->v0; cv < r->v1; cv += GMAX) {
        const int g = r->v1 - cv < GMAX ? r->v1 - cv : GMAX;
        int ow = 0;
        for (; ow + PMAX <= d->wo; ow += PMAX)
            BLK_P[g - 1](d, r, ow, cv);
        for (; ow < d->wo; ow++)
            BLK_1[g - 1](d, r, ow, cv);
    }
}

T256 void pack_avx2(const float *x, uint32_t *out, size_t rows, int c, const float *sub)
{
    const int wd = (c + 31) / 32;
    const int full = c / 32;
    const __m256 zero = _mm256_setzero_ps();
    for (size_t i = 0; i < rows; i++) {
        const float *xr = x + i * (size_t)c;
        uint32_t *o = out + i * (size_t)wd;
        for (int w = 0; w < full; w++) {
            uint32_t word = 0;
            for (int q = 0; q < 4; q++) {
                __m256 v = _mm256_loadu_ps(xr + 32 * w + 8 * q);
                if (sub)
                    v = _mm256_sub_ps(v, _mm256_loadu_ps(sub + 32 * w + 8 * q));
                word |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ)) << (8 * q);
            }
            o[w] = word;
        }
        if (full < wd) {
            uint32_t word = 0;
            for (int b = 0; b < c - 32 * full; b++) {
                const int i = 32 * full + b;
                word |= (uint32_t)((sub ? xr[i] - sub[i] : xr[i]) < 0.0f) << b;
            }
            o[full] = word;
        }
    }
}

HIDIFF_DEFINE_PACK_NCHW(pack_nchw_avx2, T256)

#endif
