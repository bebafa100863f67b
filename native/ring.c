/* Lock-free SPSC ring of uint32 words; see ring.h for the threading contract. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, pthread_condattr_setclock under -std=c11 */

#include "ring.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LR_CACHE_LINE 64
#define LR_MIN_CAPACITY 16

struct lr_ring {
    /* Producer's line: head is only stored by the producer. */
    _Alignas(LR_CACHE_LINE) _Atomic uint64_t head;
    uint64_t tail_cache; /* producer's last view of tail, saves touching the consumer's line */

    /* Consumer's line: tail is only stored by the consumer. */
    _Alignas(LR_CACHE_LINE) _Atomic uint64_t tail;
    uint64_t head_cache; /* consumer's last view of head */

    /* Constant after create. */
    _Alignas(LR_CACHE_LINE) uint32_t *buf;
    uint64_t capacity;
    uint64_t mask;

    /* Sleeping consumer; the mutex and condvar are used only on the slow path. */
    _Alignas(LR_CACHE_LINE) atomic_int sleeping;
    atomic_int wake_pending;
    pthread_mutex_t lock;
    pthread_cond_t cond;
};

lr_ring *lr_ring_create(uint64_t capacity_words) {
    if (capacity_words < LR_MIN_CAPACITY || (capacity_words & (capacity_words - 1)) != 0 ||
        capacity_words > SIZE_MAX / sizeof(uint32_t))
        return NULL;

    /* sizeof(lr_ring) and the buffer size (>= 64 bytes, a power of two) are multiples of
     * the alignment, as aligned_alloc requires. */
    lr_ring *r = aligned_alloc(LR_CACHE_LINE, sizeof(lr_ring));
    if (r == NULL)
        return NULL;
    memset(r, 0, sizeof *r);
    r->buf = aligned_alloc(LR_CACHE_LINE, (size_t)capacity_words * sizeof(uint32_t));
    if (r->buf == NULL)
        goto fail_buf;
    r->capacity = capacity_words;
    r->mask = capacity_words - 1;
    atomic_init(&r->head, 0);
    atomic_init(&r->tail, 0);
    atomic_init(&r->sleeping, 0);
    atomic_init(&r->wake_pending, 0);

    pthread_condattr_t attr;
    if (pthread_condattr_init(&attr) != 0)
        goto fail_attr;
    /* Timeouts must not jump with the wall clock. */
    int rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (rc == 0)
        rc = pthread_cond_init(&r->cond, &attr);
    pthread_condattr_destroy(&attr);
    if (rc != 0)
        goto fail_attr;
    if (pthread_mutex_init(&r->lock, NULL) != 0)
        goto fail_mutex;
    return r;

fail_mutex:
    pthread_cond_destroy(&r->cond);
fail_attr:
    free(r->buf);
fail_buf:
    free(r);
    return NULL;
}

void lr_ring_destroy(lr_ring *r) {
    if (r == NULL)
        return;
    pthread_mutex_destroy(&r->lock);
    pthread_cond_destroy(&r->cond);
    free(r->buf);
    free(r);
}

static void copy_in(lr_ring *r, uint64_t pos, const uint32_t *src, uint64_t n) {
    uint64_t off = pos & r->mask;
    uint64_t first = r->capacity - off < n ? r->capacity - off : n;
    memcpy(r->buf + off, src, first * sizeof *src);
    memcpy(r->buf, src + first, (n - first) * sizeof *src);
}

static void copy_out(const lr_ring *r, uint64_t pos, uint32_t *dst, uint64_t n) {
    uint64_t off = pos & r->mask;
    uint64_t first = r->capacity - off < n ? r->capacity - off : n;
    memcpy(dst, r->buf + off, first * sizeof *dst);
    memcpy(dst + first, r->buf, (n - first) * sizeof *dst);
}

static void signal_consumer(lr_ring *r) {
    pthread_mutex_lock(&r->lock);
    pthread_cond_signal(&r->cond);
    pthread_mutex_unlock(&r->lock);
}

/* Producer side of the sleep handshake. Pairs with the fence in lr_ring_wait: either the
 * consumer's check sees what was published before our fence, or we see sleeping == 1. */
static void wake_if_sleeping(lr_ring *r) {
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&r->sleeping, memory_order_relaxed))
        signal_consumer(r);
}

int lr_ring_write(lr_ring *r, const uint32_t *src, uint64_t n) {
    uint64_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
    if (n > r->capacity - (head - r->tail_cache)) {
        /* Acquire: the consumer's reads of the freed slots happen before we overwrite them. */
        r->tail_cache = atomic_load_explicit(&r->tail, memory_order_acquire);
        if (n > r->capacity - (head - r->tail_cache))
            return 0;
    }
    if (n == 0)
        return 1;
    copy_in(r, head, src, n);
    atomic_store_explicit(&r->head, head + n, memory_order_release);
    wake_if_sleeping(r);
    return 1;
}

/* Consumer: words available from tail, reloading head only if the cached view has fewer
 * than `want`. */
static uint64_t available(lr_ring *r, uint64_t tail, uint64_t want) {
    uint64_t avail = r->head_cache - tail;
    if (avail < want) {
        r->head_cache = atomic_load_explicit(&r->head, memory_order_acquire);
        avail = r->head_cache - tail;
    }
    return avail;
}

uint64_t lr_ring_peek(lr_ring *r, uint32_t *dst, uint64_t n) {
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    uint64_t avail = available(r, tail, n);
    if (n > avail)
        n = avail;
    if (n > 0)
        copy_out(r, tail, dst, n);
    return n;
}

void lr_ring_consume(lr_ring *r, uint64_t n) {
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    uint64_t avail = available(r, tail, n);
    if (n > avail)
        n = avail;
    /* Release: our reads of the slots happen before the producer reuses them. */
    atomic_store_explicit(&r->tail, tail + n, memory_order_release);
}

uint64_t lr_ring_read(lr_ring *r, uint32_t *dst, uint64_t max_words) {
    uint64_t n = lr_ring_peek(r, dst, max_words);
    lr_ring_consume(r, n);
    return n;
}

uint64_t lr_ring_used(lr_ring *r) {
    /* Tail first: head only grows, so head >= tail even when called from a third thread. */
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_acquire);
    uint64_t head = atomic_load_explicit(&r->head, memory_order_acquire);
    uint64_t used = head - tail;
    return used < r->capacity ? used : r->capacity;
}

uint64_t lr_ring_free(lr_ring *r) { return r->capacity - lr_ring_used(r); }

uint64_t lr_ring_capacity(lr_ring *r) { return r->capacity; }

static int has_data(lr_ring *r) {
    return atomic_load_explicit(&r->head, memory_order_acquire) !=
           atomic_load_explicit(&r->tail, memory_order_relaxed);
}

static int wait_done(lr_ring *r) {
    return has_data(r) || atomic_load_explicit(&r->wake_pending, memory_order_relaxed);
}

static struct timespec deadline_after(int64_t timeout_us) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += (time_t)(timeout_us / 1000000);
    ts.tv_nsec += (long)(timeout_us % 1000000) * 1000;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec += 1;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

int lr_ring_wait(lr_ring *r, int64_t timeout_us) {
    if (timeout_us != 0 && !wait_done(r)) {
        struct timespec deadline = {0, 0};
        if (timeout_us > 0)
            deadline = deadline_after(timeout_us);

        pthread_mutex_lock(&r->lock);
        atomic_store_explicit(&r->sleeping, 1, memory_order_relaxed);
        /* Pairs with wake_if_sleeping: publish `sleeping` before re-checking the ring. */
        atomic_thread_fence(memory_order_seq_cst);
        while (!wait_done(r)) {
            int rc = timeout_us < 0 ? pthread_cond_wait(&r->cond, &r->lock)
                                    : pthread_cond_timedwait(&r->cond, &r->lock, &deadline);
            if (rc == ETIMEDOUT)
                break;
        }
        atomic_store_explicit(&r->sleeping, 0, memory_order_relaxed);
        pthread_mutex_unlock(&r->lock);
    }
    /* Any wake up to now is answered by this return. */
    atomic_store_explicit(&r->wake_pending, 0, memory_order_relaxed);
    return has_data(r);
}

void lr_ring_wake(lr_ring *r) {
    atomic_store_explicit(&r->wake_pending, 1, memory_order_relaxed);
    wake_if_sleeping(r);
}
