/*
 * Lock-free single-producer/single-consumer ring of uint32 words.
 *
 * Threading contract: exactly one producer thread calls lr_ring_write; exactly one
 * consumer thread calls lr_ring_read, lr_ring_peek, lr_ring_consume and lr_ring_wait.
 * lr_ring_wake, lr_ring_used, lr_ring_free and lr_ring_capacity may be called from any
 * thread (used/free are then only a snapshot). create/destroy must not race with anything.
 */
#ifndef LIVELM_RING_H
#define LIVELM_RING_H

#include <stdint.h>

typedef struct lr_ring lr_ring;

/* capacity_words: a power of two >= 16. Returns NULL on a bad capacity or out of memory. */
lr_ring *lr_ring_create(uint64_t capacity_words);
void lr_ring_destroy(lr_ring *r);

/* All or nothing: returns 1 if all n words were written, 0 if they do not fit. */
int lr_ring_write(lr_ring *r, const uint32_t *src, uint64_t n);

/* Copies up to max_words available words into dst and consumes them; returns the count. */
uint64_t lr_ring_read(lr_ring *r, uint32_t *dst, uint64_t max_words);

/* Copies min(n, used) words into dst without consuming them; returns the count. */
uint64_t lr_ring_peek(lr_ring *r, uint32_t *dst, uint64_t n);

/* Drops min(n, used) words. */
void lr_ring_consume(lr_ring *r, uint64_t n);

uint64_t lr_ring_used(lr_ring *r);
uint64_t lr_ring_free(lr_ring *r);
uint64_t lr_ring_capacity(lr_ring *r);

/*
 * Consumer only. Blocks until the ring is non-empty, lr_ring_wake was called since the
 * previous lr_ring_wait returned, or timeout_us microseconds pass (timeout_us < 0: no
 * limit, 0: just poll). Returns 1 if data is available, 0 otherwise.
 */
int lr_ring_wait(lr_ring *r, int64_t timeout_us);

/* Makes the current or the next lr_ring_wait return, even though no data was written. */
void lr_ring_wake(lr_ring *r);

#endif /* LIVELM_RING_H */
