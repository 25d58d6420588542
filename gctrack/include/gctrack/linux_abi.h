/*
 * The kernel ABI that gctrack speaks: userfaultfd write-protect and the
 * PAGEMAP_SCAN ioctl on /proc/self/pagemap.
 *
 * Declared here under gct_ names because the distribution headers on the
 * machines we build on (linux-libc-dev 6.1) predate PAGEMAP_SCAN (6.7) and
 * UFFD_FEATURE_WP_ASYNC. Layouts follow include/uapi/linux/userfaultfd.h and
 * include/uapi/linux/fs.h; the static asserts pin the sizes the kernel checks.
 */
#ifndef GCTRACK_LINUX_ABI_H
#define GCTRACK_LINUX_ABI_H

#include <stdint.h>
#include <linux/ioctl.h>
#include <sys/syscall.h>

/* ---- userfaultfd ---------------------------------------------------- */

#ifndef SYS_userfaultfd
#  if defined(__x86_64__)
#    define SYS_userfaultfd 323
#  elif defined(__aarch64__)
#    define SYS_userfaultfd 282
#  endif
#endif

#define GCT_UFFD_USER_MODE_ONLY 1  /* userfaultfd(2) flag, Linux 5.11 */
#define GCT_UFFD_API 0xAAu

#define GCT_UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1ull << 12)
#define GCT_UFFD_FEATURE_WP_UNPOPULATED (1ull << 13)
#define GCT_UFFD_FEATURE_WP_ASYNC (1ull << 15)

#define GCT_UFFDIO_REGISTER_MODE_WP (1ull << 1)
#define GCT_UFFDIO_WRITEPROTECT_MODE_WP (1ull << 0)

struct gct_uffdio_api {
    uint64_t api;
    uint64_t features;
    uint64_t ioctls;
};

struct gct_uffdio_range {
    uint64_t start;
    uint64_t len;
};

struct gct_uffdio_register {
    struct gct_uffdio_range range;
    uint64_t mode;
    uint64_t ioctls;
};

struct gct_uffdio_writeprotect {
    struct gct_uffdio_range range;
    uint64_t mode;
};

#define GCT_UFFD_EVENT_PAGEFAULT 0x12
#define GCT_UFFD_PAGEFAULT_FLAG_WP (1ull << 1)

/* A message read from a (synchronous) userfaultfd; only page faults are used. */
struct gct_uffd_msg {
    uint8_t event;
    uint8_t reserved1;
    uint16_t reserved2;
    uint32_t reserved3;
    uint64_t pagefault_flags;
    uint64_t pagefault_address;
    uint64_t pagefault_feat;
};

#define GCT_UFFDIO_API _IOWR(0xAA, 0x3F, struct gct_uffdio_api)
#define GCT_UFFDIO_REGISTER _IOWR(0xAA, 0x00, struct gct_uffdio_register)
#define GCT_UFFDIO_UNREGISTER _IOR(0xAA, 0x01, struct gct_uffdio_range)
#define GCT_UFFDIO_WRITEPROTECT _IOWR(0xAA, 0x06, struct gct_uffdio_writeprotect)
#define GCT_UFFDIO_WAKE _IOR(0xAA, 0x02, struct gct_uffdio_range)

/* ---- PAGEMAP_SCAN --------------------------------------------------- */

#define GCT_PAGE_IS_WPALLOWED (1ull << 0)
#define GCT_PAGE_IS_WRITTEN (1ull << 1)
#define GCT_PAGE_IS_FILE (1ull << 2)
#define GCT_PAGE_IS_PRESENT (1ull << 3)
#define GCT_PAGE_IS_SWAPPED (1ull << 4)
#define GCT_PAGE_IS_PFNZERO (1ull << 5)
#define GCT_PAGE_IS_HUGE (1ull << 6)
#define GCT_PAGE_IS_SOFT_DIRTY (1ull << 7)

#define GCT_PM_SCAN_WP_MATCHING (1ull << 0)
#define GCT_PM_SCAN_CHECK_WPASYNC (1ull << 1)

/* One output region: pages [start, end) sharing `categories`. */
struct gct_page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};

struct gct_pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};

#define GCT_PAGEMAP_SCAN _IOWR('f', 16, struct gct_pm_scan_arg)

/* /proc/self/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst). */
#define GCT_PM_ENTRY_SOFT_DIRTY (1ull << 55)
#define GCT_PM_ENTRY_PRESENT (1ull << 63)

_Static_assert(sizeof(struct gct_uffdio_api) == 24, "uffdio_api layout");
_Static_assert(sizeof(struct gct_uffdio_register) == 32, "uffdio_register layout");
_Static_assert(sizeof(struct gct_uffdio_writeprotect) == 24, "uffdio_writeprotect layout");
_Static_assert(sizeof(struct gct_uffd_msg) == 32, "uffd_msg layout");
_Static_assert(sizeof(struct gct_page_region) == 24, "page_region layout");
_Static_assert(sizeof(struct gct_pm_scan_arg) == 96, "pm_scan_arg layout");

#endif /* GCTRACK_LINUX_ABI_H */
