/* AVX-512 path: 16 output channels per zmm (32-bit lanes), VPOPCNTD.
 *
 * Register blocking: P output pixels x G channel vectors of accumulators; per patch word the G
 * weight vectors are loaded once and each pixel's input word is broadcast once.  The loop runs
 * over channel groups (outer) and pixels (inner) so the group's weights stay in L1.
 */
#include "kernels.h"

#if HIDIFF_X86
#include <immintrin.h>
#include <string.h>

#define T512 __attribute__((target("avx512f,avx512bw,avx512vpopcntdq")))
#define INL static inline __attribute__((always_inline))
#define L 16
#define PMAX 8 /* pixels per block: 4 with 3-4 channel vectors, 8 with 1-2 */
#define GMAX 4

INL T512 void block(const conv_desc *d, const conv_row *r, int ow, int cv0, const int P,
                    const int G)
{
    __m512i acc[PMAX][GMAX];
    for (int p = 0; p < P; p++)
        for (int g = 0; g < G; g++)
            acc[p][g] = _mm512_setzero_si512();
    const size_t wstride = (size_t)d->tw * L;
    const uint32_t *wp = (const uint32_t *)d->w + (size_t)cv0 * wstride;
    const uint32_t *xb = r->x + (size_t)ow * d->step;
    const int step = d->step;
    for (int s = 0; s < d->nseg; s++) {
        const uint32_t *xs = xb + d->seg_off[s];
        const int len = d->seg_len[s];
        for (int k = 0; k < len; k++) {
            __m512i wv[GMAX];
            for (int g = 0; g < G; g++)
                wv[g] = _mm512_loadu_si512((const void *)(wp + g * wstride + (size_t)k * L));
            for (int p = 0; p < P; p++) {
                const __m512i xv = _mm512_set1_epi32((int)xs[p * step + k]);
                for (int g = 0; g < G; g++)
                    acc[p][g] = _mm512_add_epi32(
                        acc[p][g], _mm512_popcnt_epi32(_mm512_xor_si512(xv, wv[g])));
            }
        }
        wp += (size_t)len * L;
    }
    /* The epilogue, one stage at a time over the block's P pixels (fully unrolled: the
     * accumulators stay in registers, and each stage's test is made once per block, not per
     * pixel).  The row's pointers are read once, before any store. */
    const block_epilogue e = epilogue_of(d, r, ow, P);
#pragma GCC unroll 4
    for (int g = 0; g < G; g++) {
        const int c0 = (cv0 + g) * L;
        const int left = e.cout - c0;
        const __mmask16 valid = left >= L ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        const __m512 sc = _mm512_loadu_ps(d->scale + c0);
        const __m512 bi = _mm512_loadu_ps(d->bias + c0);
        __m512 v[PMAX];
#pragma GCC unroll 8
        for (int p = 0; p < P; p++) {
            __m512i a = acc[p][g];
            if (e.corr)
                a = _mm512_sub_epi32(a, _mm512_loadu_si512((const void *)(
                                            e.corr + (size_t)(ow + p) * d->cpad + c0)));
            const __m512i yi =
                _mm512_sub_epi32(_mm512_set1_epi32(e.kval[p]), _mm512_slli_epi32(a, 1));
            v[p] = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(yi), sc), bi);
        }
        if (e.thr) {
            const __m512 t = _mm512_loadu_ps(e.thr + c0);
#pragma GCC unroll 8
            for (int p = 0; p < P; p++) {
                const uint16_t bits =
                    (uint16_t)(_mm512_cmp_ps_mask(v[p], t, _CMP_LT_OQ) & valid);
                memcpy((char *)((uint32_t *)e.out + (size_t)(ow + p) * e.out_words) + c0 / 8,
                       &bits, sizeof bits);
            }
            continue;
        }
        /* the fused epilogue of kernels.h, one float32 op per stage */
        if (e.res) {
#pragma GCC unroll 8
            for (int p = 0; p < P; p++)
                v[p] = _mm512_add_ps(
                    v[p], _mm512_maskz_loadu_ps(valid, e.res + (size_t)(ow + p) * e.cout + c0));
        }
        if (e.zeta) {
            const __m512 zeta = _mm512_maskz_loadu_ps(valid, e.zeta + c0);
#pragma GCC unroll 8
            for (int p = 0; p < P; p++)
                v[p] = _mm512_add_ps(v[p], zeta);
        }
        if (e.slope) {
            const __m512 slope = _mm512_maskz_loadu_ps(valid, e.slope + c0);
#pragma GCC unroll 8
            for (int p = 0; p < P; p++)
                v[p] = _mm512_mask_blend_ps(
                    _mm512_cmp_ps_mask(v[p], _mm512_setzero_ps(), _CMP_LT_OQ), v[p],
                    _mm512_mul_ps(v[p], slope));
        }
        if (e.gamma) {
            const __m512 gamma = _mm512_maskz_loadu_ps(valid, e.gamma + c0);
#pragma GCC unroll 8
            for (int p = 0; p < P; p++)
                v[p] = _mm512_add_ps(v[p], gamma);
        }
        if (e.pout) { /* the next layer's sign bits of v - pthr */
            const __m512 pthr =
                e.pthr ? _mm512_maskz_loadu_ps(valid, e.pthr + c0) : _mm512_setzero_ps();
#pragma GCC unroll 8
            for (int p = 0; p < P; p++) {
                const __m512 dv = e.pthr ? _mm512_sub_ps(v[p], pthr) : v[p];
                const uint16_t bits = (uint16_t)(
                    _mm512_cmp_ps_mask(dv, _mm512_setzero_ps(), _CMP_LT_OQ) & valid);
                e.pout[(size_t)(ow + p) * e.out_words + c0 / 32] |= (uint32_t)bits << (c0 % 32);
            }
        }
#pragma GCC unroll 8
        for (int p = 0; p < P; p++) {
            float *o = (float *)e.out + (size_t)(ow + p) * e.cout + c0;
            if (left >= L)
                _mm512_storeu_ps(o, v[p]);
            else
                _mm512_mask_storeu_ps(o, valid, v[p]);
        }
    }
}

#define DEF(P, G)                                                                              \
    static T512 void blk_##P##_##G(const conv_desc *d, const conv_row *r, int ow, int cv0)     \
    {                                                                                          \
        block(d, r, ow, cv0, P, G);                                                            \
    }
DEF(4, 4) DEF(4, 3) DEF(8, 2) DEF(8, 1)
DEF(1, 4) DEF(1, 3) DEF(1, 2) DEF(1, 1)
#undef DEF

typedef void (*blk_fn)(const conv_desc *, const conv_row *, int, int);
static const blk_fn BLK_P[GMAX] = {blk_8_1, blk_8_2, blk_4_3, blk_4_4};
static const int NPIX[GMAX] = {8, 8, 4, 4};
static const blk_fn BLK_1[GMAX] = {blk_1_1, blk_1_2, blk_1_3, blk_1_4};

T512 void row_avx512(const conv_desc *d, const conv_row *r)
{
    for (int cv = r->v0; cv < r->v1; cv += GMAX) {
        const int g = r->v1 - cv < GMAX ? r->v1 - cv : GMAX;
        const int np = NPIX[g - 1];
        int ow = 0;
        for (; ow + np <= d->wo; ow += np)
            BLK_P[g - 1](d, r, ow, cv);
        for (; ow < d->wo; ow++)
            BLK_1[g - 1](d, r, ow, cv);
    }
}

T512 void pack_avx512(const float *x, uint32_t *out, size_t rows, int c, const float *sub)
{
    const int wd = (c + 31) / 32;
    const __m512 zero = _mm512_setzero_ps();
    for (size_t i = 0; i < rows; i++) {
        const float *xr = x + i * (size_t)c;
        uint32_t *o = out + i * (size_t)wd;
        for (int w = 0; w < wd; w++) {
            const int left = c - 32 * w;
            const __mmask16 k0 = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1u);
            const __mmask16 k1 =
                left >= 32 ? 0xFFFF : (left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1u));
            __m512 a = _mm512_maskz_loadu_ps(k0, xr + 32 * w);
            __m512 b = _mm512_maskz_loadu_ps(k1, xr + 32 * w + 16);
            if (sub) {
                a = _mm512_sub_ps(a, _mm512_maskz_loadu_ps(k0, sub + 32 * w));
                b = _mm512_sub_ps(b, _mm512_maskz_loadu_ps(k1, sub + 32 * w + 16));
            }
            const uint32_t lo = _mm512_mask_cmp_ps_mask(k0, a, zero, _CMP_LT_OQ);
            const uint32_t hi = _mm512_mask_cmp_ps_mask(k1, b, zero, _CMP_LT_OQ);
            o[w] = lo | (hi << 16);
        }
    }
}

HIDIFF_DEFINE_PACK_NCHW(pack_nchw_avx512, T512)

#endif
