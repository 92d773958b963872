// A persistent thread pool. A decode step runs a few hundred small parallel operations, so handing
// out a job must cost microseconds: workers spin on a job counter for a while after each job and
// only then sleep on a condition variable.
#include "se-impl.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void) 0)
#endif

// Spinning before sleeping: about 10-100 us. Short, because on a machine shared with other busy
// processes a thread that spins burns the time slice that the thread it waits for needs (llama.cpp
// with OpenMP's passive wait policy measured 30x faster decode on this shared machine than with its
// spinning barriers); a wake-up through the condition variable costs a few microseconds.
#define SPIN_ROUNDS 1000

struct se_pool {
    int n;                          // threads, the caller included
    pthread_t * threads;            // (n - 1) workers
    se_task_fn fn;
    void * arg;
    atomic_uint job;                // bumped for every job
    atomic_bool open;               // the current job still takes workers
    atomic_int active;              // workers inside (or checking) a job
    atomic_int sleeping;
    atomic_bool stop;
    pthread_mutex_t mu;
    pthread_cond_t wake;
    pthread_cond_t done;            // the last worker of a job signals the caller
};

typedef struct worker_arg {
    se_pool * pool;
    int ith;
} worker_arg;

static void * worker(void * p) {
    worker_arg * wa = p;
    se_pool * pool = wa->pool;
    const int ith = wa->ith;
    free(wa);
    unsigned seen = 0;
    for (;;) {
        unsigned job;
        int spins = 0;
        while ((job = atomic_load(&pool->job)) == seen && !atomic_load(&pool->stop) && spins++ < SPIN_ROUNDS) cpu_relax();
        if (job == seen && !atomic_load(&pool->stop)) {
            pthread_mutex_lock(&pool->mu);
            atomic_fetch_add(&pool->sleeping, 1);
            while ((job = atomic_load(&pool->job)) == seen && !atomic_load(&pool->stop)) pthread_cond_wait(&pool->wake, &pool->mu);
            atomic_fetch_sub(&pool->sleeping, 1);
            pthread_mutex_unlock(&pool->mu);
        }
        if (atomic_load(&pool->stop)) return NULL;
        seen = job;
        // join only while the job is open: the caller closes it once its own share is done, so a
        // worker that lost its core meanwhile is not waited for (tasks take work from a counter)
        atomic_fetch_add(&pool->active, 1);
        if (atomic_load(&pool->open) && atomic_load(&pool->job) == seen) pool->fn(pool->arg, ith, pool->n);
        if (atomic_fetch_sub(&pool->active, 1) == 1) {  // the last one: the caller may be asleep
            pthread_mutex_lock(&pool->mu);
            pthread_cond_broadcast(&pool->done);
            pthread_mutex_unlock(&pool->mu);
        }
    }
}

se_pool * se_pool_new(int n_threads) {
    se_pool * pool = calloc(1, sizeof *pool);
    if (!pool) return NULL;
    pool->n = n_threads < 1 ? 1 : n_threads;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pthread_cond_init(&pool->done, NULL);
    pool->threads = calloc((size_t) pool->n, sizeof(pthread_t));
    if (!pool->threads) {
        free(pool);
        return NULL;
    }
    for (int i = 1; i < pool->n; i++) {
        worker_arg * wa = malloc(sizeof *wa);
        if (wa) *wa = (worker_arg) {pool, i};
        if (!wa || pthread_create(&pool->threads[i - 1], NULL, worker, wa) != 0) {
            free(wa);
            pool->n = i;  // run with the threads that did start
            break;
        }
    }
    return pool;
}

void se_pool_free(se_pool * pool) {
    if (!pool) return;
    atomic_store(&pool->stop, true);
    pthread_mutex_lock(&pool->mu);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 1; i < pool->n; i++) pthread_join(pool->threads[i - 1], NULL);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->wake);
    pthread_cond_destroy(&pool->done);
    free(pool->threads);
    free(pool);
}

int se_pool_size(const se_pool * pool) { return pool->n; }

void se_pool_run(se_pool * pool, se_task_fn fn, void * arg) {
    if (pool->n == 1) {
        fn(arg, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->arg = arg;
    atomic_store(&pool->open, true);
    atomic_fetch_add(&pool->job, 1);  // publishes fn and arg (sequentially consistent)
    if (atomic_load(&pool->sleeping) > 0) {
        pthread_mutex_lock(&pool->mu);
        pthread_cond_broadcast(&pool->wake);
        pthread_mutex_unlock(&pool->mu);
    }
    fn(arg, 0, pool->n);
    // close the job, then wait for the workers inside it: a short spin, then sleep until the last
    // one signals
    atomic_store(&pool->open, false);
    for (int spins = 0; atomic_load(&pool->active) > 0 && spins < SPIN_ROUNDS; spins++) cpu_relax();
    if (atomic_load(&pool->active) > 0) {
        pthread_mutex_lock(&pool->mu);
        while (atomic_load(&pool->active) > 0) pthread_cond_wait(&pool->done, &pool->mu);
        pthread_mutex_unlock(&pool->mu);
    }
}
