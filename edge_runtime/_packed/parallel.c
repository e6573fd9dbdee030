/* A range of work split over threads for the packed backend's native elementwise passes
 * (chain.c, pointwise.c): [0, n) in `threads` contiguous chunks (multiples of `align`), the
 * caller's thread running the first; ranges shorter than `grain` per thread stay on one
 * thread (a thread start costs tens of microseconds).  Run without the GIL. */
#include "glue.h"

#if !defined(_WIN32)
#include <pthread.h>
#define PAR_THREADS 1
#else
#define PAR_THREADS 0
#endif

#define PAR_MAX 64

typedef struct {
    range_fn fn;
    void *ctx;
    Py_ssize_t lo, hi;
} par_chunk;

#if PAR_THREADS
static void *par_main(void *arg)
{
    par_chunk *c = arg;
    c->fn(c->ctx, c->lo, c->hi);
    return NULL;
}
#endif

void run_parallel(int threads, Py_ssize_t n, Py_ssize_t align, Py_ssize_t grain, range_fn fn,
                  void *ctx)
{
    if (align < 1)
        align = 1;
    int nt = threads < 1 ? 1 : threads > PAR_MAX ? PAR_MAX : threads;
    while (nt > 1 && n / nt < grain)
        nt--;
#if PAR_THREADS
    if (nt > 1) {
        par_chunk ch[PAR_MAX];
        pthread_t tid[PAR_MAX];
        int spawned[PAR_MAX] = {0};
        const Py_ssize_t units = (n + align - 1) / align;
        for (int t = 0; t < nt; t++) {
            ch[t].fn = fn, ch[t].ctx = ctx;
            ch[t].lo = units * t / nt * align;
            ch[t].hi = t + 1 == nt ? n : units * (t + 1) / nt * align;
            if (t > 0)
                spawned[t] = pthread_create(&tid[t], NULL, par_main, &ch[t]) == 0;
        }
        for (int t = 0; t < nt; t++)
            if (t == 0 || !spawned[t])
                fn(ctx, ch[t].lo, ch[t].hi);
        for (int t = 1; t < nt; t++)
            if (spawned[t])
                pthread_join(tid[t], NULL);
        return;
    }
#endif
    fn(ctx, 0, n);
}
