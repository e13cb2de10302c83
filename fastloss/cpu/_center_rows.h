/* The inner loops of the center update, in plain C so that the compiler sees
 * restrict pointers and vectorizes them; with GCC on x86-64 an AVX2 clone is
 * chosen at load time where the CPU has it (the build itself stays portable).
 *
 *     acc[d] += (double)c[d] - (double)x[d]      for d in [0, n)   (per row)
 *     c[d] = c[d] - scale * acc[d]                for d in [0, n)   (per class)
 *
 * and the canonical order of a class's rows (fl_sort_rows): the rows of one
 * class are summed in the lexicographic order of their bytes (memcmp's order),
 * which depends only on what the rows hold, never on where they are: any
 * permutation of the batch gives each class the same sequence of summands, so
 * the same float64 sum, bit for bit.  Every distinct bit pattern is its own
 * key (-0.0 and 0.0 differ, NaNs are ordered by their payload bits), and rows
 * with equal bytes are interchangeable, so ties need no rule.
 */
#ifndef FASTLOSS_CENTER_ROWS_H
#define FASTLOSS_CENTER_ROWS_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FL_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FL_CLONES
#endif

#if defined(__GNUC__)
#define FL_PREFETCH(p) __builtin_prefetch((p), 0, 3)
#else
#define FL_PREFETCH(p) ((void)(p))
#endif

static inline void fl_prefetch(const void *p) { FL_PREFETCH(p); }

/* float16 features arrive as their bits; each converts exactly (float16 -> float32 ->
 * double), as a float32 copy of the features would, without making that copy. */
static inline double fl_half_to_double(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    uint32_t bits;
    float f;
    if (exp == 0) {                       /* zero or subnormal: mant * 2**-24, exact */
        f = (float)mant * 5.9604644775390625e-08f;
        return sign ? -(double)f : (double)f;
    }
    bits = exp == 31 ? (0x7f800000u | (mant << 13))               /* inf, NaN (payload kept) */
                     : (((exp + 112u) << 23) | (mant << 13));     /* normal: rebias 15 -> 127 */
    bits |= sign;
    memcpy(&f, &bits, sizeof f);
    return (double)f;
}

#define FL_AS_DOUBLE(v) ((double)(v))
#define FL_HALF_AS_DOUBLE(v) fl_half_to_double(v)

/* `next` (the row summed after this one, or NULL) is prefetched one cache line
 * per cache line of this row: rows of a class lie at random places, which the
 * hardware prefetcher does not follow, and spreading the requests keeps them
 * within the core's miss buffers. */
#define FL_ACCUMULATE(NAME, CT, XT, LOAD)                                            \
    static FL_CLONES void NAME(double *restrict acc, const CT *restrict c,            \
                               const XT *restrict x, const XT *next, ptrdiff_t n) {   \
        const ptrdiff_t line = 64 / sizeof(XT);                                       \
        ptrdiff_t d = 0;                                                              \
        for (; d + line <= n; d += line) {                                            \
            if (next) FL_PREFETCH(next + d);                                        \
            for (ptrdiff_t k = d; k < d + line; k++)                                  \
                acc[k] += (double)c[k] - LOAD(x[k]);                                  \
        }                                                                             \
        for (; d < n; d++) acc[d] += (double)c[d] - LOAD(x[d]);                       \
    }

#define FL_MOVE(NAME, CT)                                                             \
    static FL_CLONES void NAME(CT *restrict c, const double *restrict acc, double scale,  \
                               ptrdiff_t n) {                                         \
        for (ptrdiff_t d = 0; d < n; d++) c[d] = (CT)((double)c[d] - scale * acc[d]); \
    }

FL_MOVE(fl_move_f, float)
FL_MOVE(fl_move_d, double)
FL_ACCUMULATE(fl_accumulate_ff, float, float, FL_AS_DOUBLE)
FL_ACCUMULATE(fl_accumulate_fd, float, double, FL_AS_DOUBLE)
FL_ACCUMULATE(fl_accumulate_fh, float, uint16_t, FL_HALF_AS_DOUBLE)
FL_ACCUMULATE(fl_accumulate_df, double, float, FL_AS_DOUBLE)
FL_ACCUMULATE(fl_accumulate_dd, double, double, FL_AS_DOUBLE)
FL_ACCUMULATE(fl_accumulate_dh, double, uint16_t, FL_HALF_AS_DOUBLE)

/* ------------------------------------------------------------ canonical row order */

/* A row to sort: its index and `key`, its first 8 bytes (zero-padded) read
 * big-endian, so that comparing keys as integers is memcmp on those bytes;
 * most comparisons end there, on a compact array, without touching the rows. */
typedef struct {
    uint64_t key;
    int64_t row;
} fl_row_key;

static inline uint64_t fl_row_prefix(const unsigned char *row, size_t nbytes) {
    uint64_t key = 0;
    size_t k, m = nbytes < 8 ? nbytes : 8;
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__)
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (m == 8) {
        memcpy(&key, row, 8);
        return __builtin_bswap64(key);
    }
#endif
#endif
    for (k = 0; k < m; k++) key |= (uint64_t)row[k] << (56 - 8 * k);
    return key;
}

/* Whether row a comes before row b (memcmp order of their `row_bytes` bytes). */
static inline int fl_row_less(const fl_row_key *a, const fl_row_key *b,
                              const unsigned char *base, size_t row_bytes) {
    if (a->key != b->key) return a->key < b->key;
    if (row_bytes <= 8 || a->row == b->row) return 0;
    return memcmp(base + (size_t)a->row * row_bytes + 8,
                  base + (size_t)b->row * row_bytes + 8, row_bytes - 8) < 0;
}

static void fl_insertion_sort(fl_row_key *a, ptrdiff_t n, const unsigned char *base,
                              size_t row_bytes) {
    for (ptrdiff_t i = 1; i < n; i++) {
        fl_row_key v = a[i];
        ptrdiff_t j = i;
        while (j > 0 && fl_row_less(&v, &a[j - 1], base, row_bytes)) {
            a[j] = a[j - 1];
            j--;
        }
        a[j] = v;
    }
}

#define FL_SORT_RUN 16

/* Sort a[0:n) into the canonical order: insertion sort of runs of FL_SORT_RUN,
 * then bottom-up merges through `tmp` (n entries): O(n log n) comparisons for a
 * class of any size, no recursion, no allocation.  The order is a total order
 * on contents, so whatever order the rows arrive in, the contents come out in
 * the same sequence. */
static void fl_sort_rows(fl_row_key *a, fl_row_key *tmp, ptrdiff_t n,
                         const unsigned char *base, size_t row_bytes) {
    fl_row_key *src = a, *dst = tmp, *swap;
    ptrdiff_t lo, width;
    for (lo = 0; lo < n; lo += FL_SORT_RUN)
        fl_insertion_sort(a + lo, (n - lo < FL_SORT_RUN) ? n - lo : FL_SORT_RUN, base, row_bytes);
    for (width = FL_SORT_RUN; width < n; width *= 2) {
        for (lo = 0; lo < n; lo += 2 * width) {
            ptrdiff_t mid = lo + width < n ? lo + width : n;
            ptrdiff_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            ptrdiff_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi)
                dst[k++] = fl_row_less(&src[j], &src[i], base, row_bytes) ? src[j++] : src[i++];
            while (i < mid) dst[k++] = src[i++];
            while (j < hi) dst[k++] = src[j++];
        }
        swap = src;
        src = dst;
        dst = swap;
    }
    if (src != a) memcpy(a, src, (size_t)n * sizeof(fl_row_key));
}

/* Fill keys[0:n) for the rows order[0:n) of `base` (rows of `row_bytes`
 * bytes), the rows a few ahead prefetched, then sort them. */
static void fl_order_rows(fl_row_key *keys, fl_row_key *tmp, const int64_t *order, ptrdiff_t n,
                          const unsigned char *base, size_t row_bytes) {
    const ptrdiff_t ahead = 8;
    ptrdiff_t r;
    for (r = 0; r < n && r < ahead; r++) FL_PREFETCH(base + (size_t)order[r] * row_bytes);
    for (r = 0; r < n; r++) {
        if (r + ahead < n) FL_PREFETCH(base + (size_t)order[r + ahead] * row_bytes);
        keys[r].row = order[r];
        keys[r].key = fl_row_prefix(base + (size_t)order[r] * row_bytes, row_bytes);
    }
    fl_sort_rows(keys, tmp, n, base, row_bytes);
}

#endif
