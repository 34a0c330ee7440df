/*
 * A bump allocator over one GPU virtual address range, for torch's CUDAPluggableAllocator
 * (dynsnap_core.gms.regions.PrivateRegion.torch_pool): torch allocations made inside
 * `with region.torch_pool():` land in the region, so releasing the region frees their physical
 * memory and reacquiring it brings them back at the same addresses.
 *
 * torch calls gms_pool_alloc(size, device, stream) / gms_pool_free(ptr, size, device, stream) with no
 * user pointer, so the range lives in ONE process-wide slot guarded by a mutex: the single exception to
 * dynsnap's "no global state" rule, forced by that callback signature. Python sets the slot with
 * gms_pool_set() before the pool is used and clears it with gms_pool_clear().
 *
 * Policy: allocations are carved in order (512-byte aligned, as torch expects); freed bytes are reused
 * only when every allocation has been freed (the pool then starts over). torch's caching allocator sits
 * above this and reuses freed blocks itself, so the pool sees few, large, long-lived requests.
 * Out of range: NULL (torch raises its out-of-memory error).
 */
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define GMS_POOL_ALIGN 512u

struct gms_pool {
    pthread_mutex_t lock;
    uintptr_t base;
    size_t size;
    size_t used;
    size_t live;        /* allocations not freed yet */
    int device;
};

static struct gms_pool slot = {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, -1};

/* Point the pool at [base, base + size) on `device`; -EBUSY while another range still has live allocations. */
int gms_pool_set(uint64_t base, uint64_t size, int device)
{
    int rc = 0;
    if (base == 0 || size == 0 || base % GMS_POOL_ALIGN)
        return -EINVAL;
    pthread_mutex_lock(&slot.lock);
    if (slot.live && (slot.base != (uintptr_t)base || slot.size != (size_t)size)) {
        rc = -EBUSY;
    } else if (slot.base != (uintptr_t)base || slot.size != (size_t)size) {
        slot.base = (uintptr_t)base;
        slot.size = (size_t)size;
        slot.used = 0;
        slot.device = device;
    }
    pthread_mutex_unlock(&slot.lock);
    return rc;
}

/* Forget the range; -EBUSY while allocations in it are live. */
int gms_pool_clear(void)
{
    int rc = 0;
    pthread_mutex_lock(&slot.lock);
    if (slot.live) {
        rc = -EBUSY;
    } else {
        slot.base = 0;
        slot.size = 0;
        slot.used = 0;
        slot.device = -1;
    }
    pthread_mutex_unlock(&slot.lock);
    return rc;
}

/* used bytes, live allocations and the range, for tests and status. */
void gms_pool_stats(uint64_t *base, uint64_t *size, uint64_t *used, uint64_t *live)
{
    pthread_mutex_lock(&slot.lock);
    *base = slot.base;
    *size = slot.size;
    *used = slot.used;
    *live = slot.live;
    pthread_mutex_unlock(&slot.lock);
}

void *gms_pool_alloc(size_t size, int device, void *stream)
{
    void *p = NULL;
    size_t need;
    (void)stream;
    if (size == 0 || size > SIZE_MAX - GMS_POOL_ALIGN)
        return NULL;
    need = (size + GMS_POOL_ALIGN - 1) / GMS_POOL_ALIGN * GMS_POOL_ALIGN;
    pthread_mutex_lock(&slot.lock);
    if (slot.base && device == slot.device && need <= slot.size - slot.used) {
        p = (void *)(slot.base + slot.used);
        slot.used += need;
        slot.live++;
    }
    pthread_mutex_unlock(&slot.lock);
    return p;
}

void gms_pool_free(void *ptr, size_t size, int device, void *stream)
{
    uintptr_t a = (uintptr_t)ptr;
    (void)size;
    (void)device;
    (void)stream;
    pthread_mutex_lock(&slot.lock);
    if (slot.base && a >= slot.base && a < slot.base + slot.size && slot.live) {
        slot.live--;
        if (slot.live == 0)
            slot.used = 0;
    }
    pthread_mutex_unlock(&slot.lock);
}
