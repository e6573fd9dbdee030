/* Path-independent part of the binary convolution: spatial padding of the packed input, weight
 * repacking into the cout-vector layout, padding corrections for pad_value 0, the row loop and
 * the optional thread split (parallel.c).  No Python objects here (runs without the GIL). */
#include <stdlib.h>
#include <string.h>

#include "glue.h"

static inline int popcount32(uint32_t v)
{
    v = v - ((v >> 1) & 0x55555555u);
    v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
    return (int)((((v + (v >> 4)) & 0x0F0F0F0Fu) * 0x01010101u) >> 24);
}

static const uint8_t POPCOUNT4[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};

typedef struct {
    const bconv_args *a;
    conv_desc d;
    const uint32_t *xpad;
    int hp, wp, wd;
    const int32_t *wpc;    /* [kh*kw][cpad] weight popcount per tap (pad_value 0 only) */
    const int32_t *col01;  /* [wo][2] first and one-past-last valid kernel column */
    size_t out_pixel_bytes;
    int vblock;            /* channel vectors per pass over the rows (weights stay in L2) */
    int epilogue;          /* apply a->epilogue (some stage present, float output) */
} job_t;

/* Valid kernel taps [*lo, *hi) of output coordinate o along an axis of input size n. */
static void valid_range(int o, int stride, int pad, int dil, int k, int n, int *lo, int *hi)
{
    *lo = k;
    *hi = 0;
    for (int i = 0; i < k; i++) {
        const int pos = o * stride - pad + i * dil;
        if (pos >= 0 && pos < n) {
            if (i < *lo)
                *lo = i;
            *hi = i + 1;
        }
    }
    if (*hi <= *lo)
        *lo = *hi = 0;
}

/* pad_value 0: per output pixel of a row whose valid kernel rows are [lo, hi), the number of
 * counted taps times cin (kval) and the weight popcounts of the padded taps (corr); pixels with
 * the same valid columns as the one before copy its terms.  row->zero0, zero1: the first run of
 * pixels with no padded tap (their corr is zero; the paths may skip it there). */
static void zero_pad_terms(const job_t *j, int lo, int hi, int32_t *kval, int32_t *corr,
                           conv_row *row)
{
    const bconv_args *a = j->a;
    const int cpad = j->d.cpad, kh = a->kh, kw = a->kw;
    const size_t bytes = sizeof(int32_t) * (size_t)cpad;
    int z0 = -1, z1 = -1;
    for (int ow = 0; ow < a->wo; ow++) {
        const int c0 = j->col01[2 * ow], c1 = j->col01[2 * ow + 1];
        int32_t *cr = corr + (size_t)ow * cpad;
        kval[ow] = (hi - lo) * (c1 - c0) * a->cin;
        const int full = lo == 0 && hi == kh && c0 == 0 && c1 == kw;
        if (full && z0 < 0)
            z0 = ow;
        if (!full && z0 >= 0 && z1 < 0)
            z1 = ow;
        if (ow > 0 && c0 == j->col01[2 * ow - 2] && c1 == j->col01[2 * ow - 1]) {
            memcpy(cr, cr - cpad, bytes);
            continue;
        }
        memset(cr, 0, bytes);
        for (int i = 0; i < kh; i++)
            for (int t = 0; t < kw; t++) {
                if (i >= lo && i < hi && t >= c0 && t < c1)
                    continue;
                const int32_t *wt = j->wpc + (size_t)(i * kw + t) * cpad;
                for (int c = 0; c < cpad; c++)
                    cr[c] += wt[c];
            }
    }
    row->zero0 = z0 < 0 ? 0 : z0;
    row->zero1 = z0 < 0 ? 0 : (z1 < 0 ? a->wo : z1);
}

static int run_rows(const job_t *j, int r0, int r1)
{
    const bconv_args *a = j->a;
    const conv_desc *d = &j->d;
    const int wo = a->wo, cpad = d->cpad, kh = a->kh, kw = a->kw;
    int32_t *kval = malloc(sizeof(int32_t) * (size_t)wo);
    int32_t *corr = a->pad_zero ? malloc(sizeof(int32_t) * (size_t)wo * (size_t)cpad) : NULL;
    int32_t *scratch = malloc(sizeof(int32_t) * (size_t)wo * (size_t)cpad);
    /* the path applies the epilogue and the packing as it stores (one pass over each row) */
    const int fused = a->fuses_epilogue && !a->thr && (j->epilogue || a->pout);
    /* otherwise, when the output takes the residual's buffer, rows go through a scratch row */
    const int inplace = !fused && j->epilogue && a->res != NULL && (const void *)a->res == a->out;
    float *yrow = inplace ? malloc(sizeof(float) * (size_t)wo * (size_t)a->cout) : NULL;
    if (!kval || !scratch || (a->pad_zero && !corr) || (inplace && !yrow)) {
        free(kval);
        free(corr);
        free(scratch);
        free(yrow);
        return -1;
    }
    for (int ow = 0; ow < wo; ow++)
        kval[ow] = kh * kw * a->cin;
    int cached_lo = -1, cached_hi = -1;
    conv_row row;
    memset(&row, 0, sizeof row);
    row.kval = kval;
    row.corr = corr;
    row.scratch = scratch;
    row.fused = fused;
    row.slope = a->slope;
    const int out_words = (a->cout + 31) / 32;
    const int lanes = j->a->prep->lanes, nvec = cpad / lanes;
    for (int v0 = 0; v0 < nvec; v0 += j->vblock) {
        row.v0 = v0;
        row.v1 = nvec - v0 < j->vblock ? nvec : v0 + j->vblock;
        for (int r = r0; r < r1; r++) {
            const int n = r / a->ho, oh = r % a->ho;
            if (a->pad_zero) {
                int lo, hi;
                valid_range(oh, a->sh, a->ph, a->dh, kh, a->h, &lo, &hi);
                if (lo != cached_lo || hi != cached_hi) {
                    cached_lo = lo;
                    cached_hi = hi;
                    zero_pad_terms(j, lo, hi, kval, corr, &row);
                }
            }
            row.x = j->xpad + (size_t)(n * j->hp + oh * a->sh) * (size_t)j->wp * (size_t)j->wd;
            row.out = inplace ? (void *)yrow
                              : (char *)a->out + (size_t)r * (size_t)wo * j->out_pixel_bytes;
            if (fused) {
                const size_t off = (size_t)r * (size_t)wo * (size_t)a->cout;
                row.res = a->res ? a->res + off : NULL;
                row.zeta = a->zeta ? a->zeta + (size_t)n * a->zeta_bstride : NULL;
                row.gamma = a->gamma ? a->gamma + (size_t)n * a->gamma_bstride : NULL;
                row.pthr = a->pthr ? a->pthr + (size_t)n * a->pthr_bstride : NULL;
                row.pout = a->pout ? a->pout + (size_t)r * (size_t)wo * (size_t)out_words : NULL;
                if (row.pout && row.v0 == 0) /* bits are or-ed in per vector of channels */
                    memset(row.pout, 0, sizeof(uint32_t) * (size_t)wo * (size_t)out_words);
                a->row(d, &row);
                continue;
            }
            a->row(d, &row);
            if (j->epilogue) {
                const size_t off = (size_t)r * (size_t)wo * (size_t)a->cout;
                const int c1 = row.v1 * lanes < a->cout ? row.v1 * lanes : a->cout;
                float *io = (float *)a->out + off;
                a->epilogue(io, inplace ? yrow : (a->res ? a->res + off : NULL),
                            a->zeta ? a->zeta + (size_t)n * a->zeta_bstride : NULL, a->slope,
                            a->gamma ? a->gamma + (size_t)n * a->gamma_bstride : NULL, wo,
                            a->cout, row.v0 * lanes, c1);
            }
            if (a->pout && row.v1 == nvec) /* the row is final: its sign words */
                a->pack((const float *)a->out + (size_t)r * (size_t)wo * (size_t)a->cout,
                        a->pout + (size_t)r * (size_t)wo * (size_t)((a->cout + 31) / 32),
                        (size_t)wo, a->cout,
                        a->pthr ? a->pthr + (size_t)n * a->pthr_bstride : NULL);
        }
    }
    free(kval);
    free(corr);
    free(scratch);
    free(yrow);
    return 0;
}

typedef struct {
    const job_t *job;
    int status; /* -1 once a chunk failed (each failing chunk writes -1; read after all ran) */
} rows_job;

static void rows_range(void *ctx, Py_ssize_t lo, Py_ssize_t hi)
{
    rows_job *r = ctx;
    if (run_rows(r->job, (int)lo, (int)hi) < 0)
        r->status = -1;
}

/* All n * ho output rows, split over the threads (parallel.c). */
/* Below this many patch words x output channels per thread a layer stays on one thread. */
#define MIN_WORK_PER_THREAD ((long long)1 << 19)

static int run_all(const job_t *j)
{
    const int nrows = j->a->n * j->a->ho;
    const long long per_row = (long long)j->a->wo * j->d.tw * j->d.cpad;
    rows_job r = {.job = j, .status = 0};
    run_parallel(j->a->threads, nrows, 1, (Py_ssize_t)(MIN_WORK_PER_THREAD / (per_row + 1) + 1),
                 rows_range, &r);
    return r.status;
}

prepared_t *prepare_weights(const uint32_t *w, int cout, int cin, int kh, int kw, int path,
                            const path_desc *pd)
{
    prepared_t *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    const int L = pd->lanes, wd = (cin + 31) / 32, kk = kh * kw;
    const int cpad = (cout + L - 1) / L * L;
    const size_t tw = (size_t)kk * wd;
    *p = (prepared_t){.path = path, .cout = cout, .cin = cin, .kh = kh, .kw = kw, .wd = wd,
                      .cpad = cpad, .tw = (int)tw, .lanes = L, .layout = pd->layout};
    p->wpc = calloc((size_t)kk * cpad, sizeof(int32_t));
    if (pd->layout == LAYOUT_LUT)
        p->w = calloc((size_t)cpad * tw * 128, 1);
    else
        p->w = calloc((size_t)cpad * tw, sizeof(uint32_t));
    if (!p->wpc || !p->w) {
        free_prepared(p);
        return NULL;
    }
    for (int c = 0; c < cout; c++)
        for (int t = 0; t < kk; t++)
            for (int k = 0; k < wd; k++)
                p->wpc[(size_t)t * cpad + c] += popcount32(w[((size_t)c * kk + t) * wd + k]);
    for (int c = 0; c < cout; c++) {
        const size_t g = (size_t)(c / L), l = (size_t)(c % L);
        for (size_t t = 0; t < tw; t++) {
            const uint32_t word = w[(size_t)c * tw + t];
            if (pd->layout == LAYOUT_WORDS) {
                ((uint32_t *)p->w)[(g * tw + t) * L + l] = word;
                continue;
            }
            /* byte 4*i + j of a row holds channel j * L/4 + i (see kernel_portable.c) */
            const size_t b = 4 * (l % (size_t)(L / 4)) + l / (size_t)(L / 4);
            uint8_t *lut = (uint8_t *)p->w + (g * tw + t) * 128 * L;
            for (int n = 0; n < 8; n++) {
                const uint32_t nib = (word >> (4 * n)) & 15u;
                for (uint32_t v = 0; v < 16; v++)
                    lut[((size_t)n * 16 + v) * L + b] = POPCOUNT4[v ^ nib];
            }
        }
    }
    return p;
}

void free_prepared(prepared_t *p)
{
    if (p) {
        free(p->w);
        free(p->wpc);
        free(p);
    }
}

int bconv_run(const bconv_args *a)
{
    const prepared_t *pw = a->prep;
    const int wd = pw->wd, kk = a->kh * a->kw, cpad = pw->cpad;
    const int hp = a->h + 2 * a->ph, wp = a->w + 2 * a->pw;
    job_t j;
    memset(&j, 0, sizeof j);
    j.a = a;
    j.hp = hp;
    j.wp = wp;
    j.wd = wd;
    j.out_pixel_bytes = a->thr ? sizeof(uint32_t) * (size_t)((a->cout + 31) / 32)
                               : sizeof(float) * (size_t)a->cout;

    uint32_t *xpad = NULL;
    int32_t *segs = NULL, *col01 = NULL;
    float *vec = NULL;
    int status = -1;

    if (a->ph || a->pw) {
        xpad = calloc((size_t)a->n * hp * wp * wd, sizeof(uint32_t));
        if (!xpad)
            goto done;
        const size_t row_words = (size_t)a->w * wd;
        for (int n = 0; n < a->n; n++)
            for (int y = 0; y < a->h; y++)
                memcpy(xpad + ((size_t)(n * hp + y + a->ph) * wp + a->pw) * wd,
                       a->x + (size_t)(n * a->h + y) * row_words, row_words * sizeof(uint32_t));
    }
    j.xpad = xpad ? xpad : a->x;

    segs = malloc(sizeof(int32_t) * (2 * (size_t)kk + (size_t)pw->tw));
    vec = malloc(sizeof(float) * 3 * (size_t)cpad);
    col01 = malloc(sizeof(int32_t) * 2 * (size_t)a->wo);
    if (!segs || !vec || !col01)
        goto done;
    for (int c = 0; c < cpad; c++) {
        const int in = c < a->cout;
        vec[c] = in && a->scale ? a->scale[c] : 1.0f;
        vec[cpad + c] = in && a->bias ? a->bias[c] : 0.0f;
        vec[2 * cpad + c] = in && a->thr ? a->thr[c] : 0.0f;
    }
    for (int ow = 0; ow < a->wo; ow++)
        valid_range(ow, a->sw, a->pw, a->dw, a->kw, a->w, &col01[2 * ow], &col01[2 * ow + 1]);

    /* contiguous runs of patch words, in weight order (kernel row, kernel column, word): kept as
     * [nseg] offsets followed by [nseg] lengths */
    int nseg = 0;
    int32_t *len = segs + kk;
    for (int i = 0; i < a->kh; i++)
        for (int t = 0; t < a->kw; t++) {
            const int32_t off = (int32_t)(((size_t)i * a->dh * wp + (size_t)t * a->dw) * wd);
            if (nseg > 0 && segs[nseg - 1] + len[nseg - 1] == off) {
                len[nseg - 1] += wd;
            } else {
                segs[nseg] = off;
                len[nseg] = wd;
                nseg++;
            }
        }

    int32_t *tw_off = segs + 2 * kk;
    for (int s = 0, t = 0; s < nseg; s++)
        for (int k = 0; k < len[s]; k++)
            tw_off[t++] = segs[s] + k;

    j.d = (conv_desc){
        .wd = wd, .cout = a->cout, .cpad = cpad, .wo = a->wo, .step = a->sw * wd,
        .tw = pw->tw, .nseg = nseg, .seg_off = segs, .seg_len = len, .tw_off = tw_off, .w = pw->w,
        .scale = vec, .bias = vec + cpad, .thr = a->thr ? vec + 2 * cpad : NULL,
        .out_words = (a->cout + 31) / 32,
    };
    j.wpc = pw->wpc;
    j.col01 = col01;
    /* Passes over the rows with at most ~512 KiB of prepared weights each (L2-resident); the
     * popcount paths keep multiples of 4 vectors (their channel blocking). */
    const size_t vec_bytes = (size_t)pw->tw * pw->lanes * (pw->layout == LAYOUT_LUT ? 128 : 4);
    const int nvec = cpad / pw->lanes;
    j.vblock = (int)((512u << 10) / vec_bytes);
    if (j.vblock >= 4)
        j.vblock -= j.vblock % 4;
    if (j.vblock < 1)
        j.vblock = 1;
    if (j.vblock > nvec)
        j.vblock = nvec;
    if (a->thr)
        memset(a->out, 0, (size_t)a->n * a->ho * a->wo * j.out_pixel_bytes);
    j.epilogue = !a->thr && (a->res || a->zeta || a->slope || a->gamma);
    if ((j.epilogue && !a->epilogue && !a->fuses_epilogue) || (a->pout && (a->thr || !a->pack)))
        goto done; /* misuse: the glue never asks for this */
    status = run_all(&j);
done:
    free(xpad);
    free(segs);
    free(col01);
    free(vec);
    return status;
}
