/*
 * The reference the library is measured against: the same pass written as
 * plain C with nothing around it. Arm a range with userfaultfd WP_ASYNC, then
 * PAGEMAP_SCAN with PM_SCAN_WP_MATCHING and turn the regions into card bits.
 * Loaded by benchmarks/conftest.py through ctypes.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "gctrack/linux_abi.h"

/* A userfaultfd with [start, start+len) registered and write-protected, or -errno. */
int raw_arm(uint64_t start, uint64_t len)
{
    struct gct_uffdio_api api = {GCT_UFFD_API,
                                 GCT_UFFD_FEATURE_WP_ASYNC | GCT_UFFD_FEATURE_WP_UNPOPULATED, 0};
    struct gct_uffdio_register reg = {{start, len}, GCT_UFFDIO_REGISTER_MODE_WP, 0};
    struct gct_uffdio_writeprotect wp = {{start, len}, GCT_UFFDIO_WRITEPROTECT_MODE_WP};
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | GCT_UFFD_USER_MODE_ONLY);
    if (fd < 0)
        return -errno;
    if (ioctl(fd, GCT_UFFDIO_API, &api) || ioctl(fd, GCT_UFFDIO_REGISTER, &reg) ||
        ioctl(fd, GCT_UFFDIO_WRITEPROTECT, &wp)) {
        int err = errno;
        close(fd);
        return -err;
    }
    return fd;
}

static void set_bits(uint64_t *words, uint64_t first, uint64_t last)
{
    uint64_t fw = first / 64, lw = last / 64;
    uint64_t head = ~0ull << (first % 64), tail = ~0ull >> (63 - last % 64);
    if (fw == lw) {
        words[fw] |= head & tail;
        return;
    }
    words[fw] |= head;
    for (uint64_t w = fw + 1; w < lw; w++)
        words[w] = ~0ull;
    words[lw] |= tail;
}

/* One scan-with-WP pass over [start, end) into the card bits; pages seen or -errno. */
long raw_pass(int pagemap_fd, uint64_t start, uint64_t end, struct gct_page_region *vec,
              uint64_t vec_len, uint64_t *words, uint64_t base, unsigned card_shift)
{
    struct gct_pm_scan_arg arg;
    long pages = 0;
    memset(&arg, 0, sizeof(arg));
    arg.size = sizeof(arg);
    arg.flags = GCT_PM_SCAN_WP_MATCHING | GCT_PM_SCAN_CHECK_WPASYNC;
    arg.end = end;
    arg.vec = (uint64_t)(uintptr_t)vec;
    arg.vec_len = vec_len;
    arg.category_mask = arg.return_mask = GCT_PAGE_IS_WRITTEN;
    for (arg.start = start;;) {
        int n = ioctl(pagemap_fd, GCT_PAGEMAP_SCAN, &arg);
        if (n < 0)
            return -errno;
        for (int i = 0; i < n; i++) {
            pages += (long)((vec[i].end - vec[i].start) / 4096);
            set_bits(words, (vec[i].start - base) >> card_shift, (vec[i].end - 1 - base) >> card_shift);
        }
        if ((uint64_t)n < vec_len || arg.walk_end >= end)
            return pages;
        arg.start = arg.walk_end;
    }
}

/* One report-only pass over [start, end) (no write-protect): the floor a
 * remark's final pass is measured against. Pages reported, or -errno. */
long raw_walk(int pagemap_fd, uint64_t start, uint64_t end, struct gct_page_region *vec,
              uint64_t vec_len)
{
    struct gct_pm_scan_arg arg;
    long pages = 0;
    memset(&arg, 0, sizeof(arg));
    arg.size = sizeof(arg);
    arg.end = end;
    arg.vec = (uint64_t)(uintptr_t)vec;
    arg.vec_len = vec_len;
    arg.category_mask = arg.return_mask = GCT_PAGE_IS_WRITTEN;
    for (arg.start = start;;) {
        int n = ioctl(pagemap_fd, GCT_PAGEMAP_SCAN, &arg);
        if (n < 0)
            return -errno;
        for (int i = 0; i < n; i++)
            pages += (long)((vec[i].end - vec[i].start) / 4096);
        if ((uint64_t)n < vec_len || arg.walk_end >= end)
            return pages;
        arg.start = arg.walk_end;
    }
}
