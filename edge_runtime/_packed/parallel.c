/* A range of work split over threads for the packed backend's native passes (driver.c,
 * chain.c, pointwise.c, shifted.c): [0, n) in `threads` contiguous chunks (multiples of
 * `align`), the caller's thread running the first; ranges shorter than `grain` per thread stay
 * on one thread.  Run without the GIL.
 *
 * The other chunks run on persistent worker threads, started on first use.  Starting and
 * joining a thread per call cost ~34 us on the 2-core machine of benchmarks/results/edge.md,
 * and a refiner step makes dozens of such calls, many of them 0.1-0.3 ms long.  A worker waits
 * for the next call by spinning (a `pause` loop) for SPIN_NS after its last chunk, so that calls
 * a step makes back to back start at once, then sleeps on a condition variable.  One call at a
 * time uses the workers; a call made while another is running (another Python thread) runs on
 * its caller's thread alone.  A forked child starts its own workers. */
#include "glue.h"

#if !defined(_WIN32)
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
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
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

/* how long a worker keeps spinning for the next call before it sleeps */
#define SPIN_NS 200000

static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER; /* one call on the workers */
static pthread_mutex_t sleep_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t sleep_cv = PTHREAD_COND_INITIALIZER;
typedef struct {
    atomic_ulong gen; /* the call this chunk belongs to (stored after the chunk) */
    par_chunk chunk;
} par_slot;

static par_slot slots[PAR_MAX];    /* slots[id]: worker id's chunk */
static atomic_ulong generation;    /* one more per call */
static atomic_int pending;         /* chunks of the current call not yet finished */
static atomic_int sleepers;        /* workers asleep (or about to be) on sleep_cv */
static int started;                /* workers 1 .. started are running (under call_mu) */
static int atfork_registered;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *worker(void *arg)
{
    const int id = (int)(intptr_t)arg;
    unsigned long seen = 0; /* not the current generation: a worker started for a call runs
                             * that call's chunk however late it starts */
    for (;;) {
        unsigned long g;
        uint64_t since = 0;
        unsigned spins = 0;
        while ((g = atomic_load(&generation)) == seen) {
            if (++spins % 256) {
                CPU_RELAX();
                continue;
            }
            const uint64_t t = now_ns();
            if (!since) {
                since = t;
            } else if (t - since > SPIN_NS) {
                /* sleepers before the generation check, as the caller bumps the generation
                 * before it reads sleepers (both sequentially consistent): no lost wake-up */
                pthread_mutex_lock(&sleep_mu);
                atomic_fetch_add(&sleepers, 1);
                while (atomic_load(&generation) == seen)
                    pthread_cond_wait(&sleep_cv, &sleep_mu);
                atomic_fetch_sub(&sleepers, 1);
                pthread_mutex_unlock(&sleep_mu);
                since = 0;
            }
        }
        seen = g;
        /* a worker that saw a call late may see the next one's generation only: its slot
         * says whether it has a chunk of the call it saw */
        if (atomic_load(&slots[id].gen) == g) {
            const par_chunk c = slots[id].chunk;
            c.fn(c.ctx, c.lo, c.hi);
            atomic_fetch_sub(&pending, 1);
        }
    }
    return NULL;
}

static void after_fork_in_child(void)
{
    /* the workers did not survive the fork: the child starts its own, and none of them may
     * take a chunk of a call the parent made (a new worker runs its slot's chunk when the
     * slot holds the generation it sees) */
    for (int t = 0; t < PAR_MAX; t++)
        atomic_store(&slots[t].gen, 0);
    atomic_store(&generation, 0);
    pthread_mutex_init(&call_mu, NULL);
    pthread_mutex_init(&sleep_mu, NULL);
    pthread_cond_init(&sleep_cv, NULL);
    atomic_store(&sleepers, 0);
    atomic_store(&pending, 0);
    started = 0;
}

/* Start workers up to id `want` (under call_mu); the number running. */
static int start_workers(int want)
{
    if (!atfork_registered)
        atfork_registered = pthread_atfork(NULL, NULL, after_fork_in_child) == 0 ? 1 : -1;
    if (atfork_registered < 0)
        return 0;
    while (started < want) {
        pthread_t tid;
        pthread_attr_t attr;
        if (pthread_attr_init(&attr) != 0)
            break;
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int ok = pthread_create(&tid, &attr, worker, (void *)(intptr_t)(started + 1)) == 0;
        pthread_attr_destroy(&attr);
        if (!ok)
            break;
        started++;
    }
    return started;
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
    if (nt > 1 && pthread_mutex_trylock(&call_mu) == 0) {
        const int workers = start_workers(nt - 1);
        if (nt > workers + 1)
            nt = workers + 1;
        const Py_ssize_t units = (n + align - 1) / align;
        Py_ssize_t bounds[PAR_MAX + 1];
        for (int t = 0; t <= nt; t++)
            bounds[t] = t == nt ? n : units * t / nt * align;
        if (nt > 1) {
            const unsigned long g = atomic_load(&generation) + 1;
            atomic_store(&pending, nt - 1);
            for (int t = 1; t < nt; t++) {
                slots[t].chunk = (par_chunk){fn, ctx, bounds[t], bounds[t + 1]};
                atomic_store(&slots[t].gen, g);
            }
            atomic_store(&generation, g);
            if (atomic_load(&sleepers) > 0) {
                pthread_mutex_lock(&sleep_mu);
                pthread_cond_broadcast(&sleep_cv);
                pthread_mutex_unlock(&sleep_mu);
            }
        }
        fn(ctx, bounds[0], bounds[1]);
        while (atomic_load(&pending) > 0)
            CPU_RELAX();
        pthread_mutex_unlock(&call_mu);
        return;
    }
#endif
    fn(ctx, 0, n);
}
