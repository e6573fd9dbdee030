/* Elementwise chains of the packed backend (chain.c kernels, chain_py.c the Python glue):
 * the types both share.  See chain.c for what a chain computes. */
#ifndef HIDIFF_CHAIN_H
#define HIDIFF_CHAIN_H

#include "glue.h"

#define MAX_STEPS 16
#define CHUNK 2048 /* floats per chunk (8 KiB) */

/* SUB: the value of the start's second lookup chain (chain_start.sub) */
enum { FULL = 0, CHANNEL = 1, SCALAR = 2, ITEM = 3, SUB = 4 };

typedef struct chain_step {
    char op;
    int kind;
    const float *p;      /* FULL: like x; ITEM: one batch item of x, shared by all; SUB: NULL;
                          * CHANNEL: [n or 1][c]; SCALAR: one value */
    Py_ssize_t bstride;  /* CHANNEL: floats between batch items (0: shared) */
} chain_step;

typedef struct {
    const float *x;        /* the start map, or NULL with a table */
    const uint32_t *idx;   /* [n * pixels] table rows (with a table) */
    const float *table;    /* [rows][c] or NULL */
    /* optional: the next binary layer's input, bit c of word c / 32 of each pixel set where
     * result - psub[c] < 0 (the float32 difference, as ONNX Sub then the sign) */
    uint32_t *words;       /* [n * pixels][wd], zeroed, or NULL */
    const float *psub;     /* [n or 1][c] */
    Py_ssize_t psub_bstride, wd;
    /* optional, with a table: a second lookup of the same rows through table2 ([rows][c])
     * followed by nsub steps (none of kind SUB), the operand of the steps of kind SUB */
    const float *table2;
    const struct chain_step *sub;
    int nsub;
} chain_start;


/* The chain over the whole result (size floats, n items of c channels), split over `threads`
 * (chain.c: the variant of the default kernel path).  Call without the GIL. */
void chain_run(const chain_start *st, float *out, Py_ssize_t size, Py_ssize_t n, Py_ssize_t c,
               const chain_step *steps, int nsteps, int threads);

#endif
