/* The inner loop of the center update, in plain C so that the compiler sees
 * restrict pointers and vectorizes it; with GCC on x86-64 an AVX2 clone is
 * chosen at load time where the CPU has it (the build itself stays portable).
 *
 *     acc[d] += (double)c[d] - (double)x[d]      for d in [0, n)   (per row)
 *     c[d] = c[d] - scale * acc[d]                for d in [0, n)   (per class)
 */
#ifndef FASTLOSS_CENTER_ROWS_H
#define FASTLOSS_CENTER_ROWS_H
#include <stddef.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FL_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FL_CLONES
#endif

#define FL_ACCUMULATE(NAME, CT, XT)                                                  \
    static FL_CLONES void NAME(double *restrict acc, const CT *restrict c,            \
                               const XT *restrict x, ptrdiff_t n) {                   \
        for (ptrdiff_t d = 0; d < n; d++) acc[d] += (double)c[d] - (double)x[d];      \
    }

#define FL_MOVE(NAME, CT)                                                             \
    static FL_CLONES void NAME(CT *restrict c, const double *restrict acc, double scale,  \
                               ptrdiff_t n) {                                         \
        for (ptrdiff_t d = 0; d < n; d++) c[d] = (CT)((double)c[d] - scale * acc[d]); \
    }

FL_MOVE(fl_move_f, float)
FL_MOVE(fl_move_d, double)
FL_ACCUMULATE(fl_accumulate_ff, float, float)
FL_ACCUMULATE(fl_accumulate_fd, float, double)
FL_ACCUMULATE(fl_accumulate_df, double, float)
FL_ACCUMULATE(fl_accumulate_dd, double, double)

/* Ask for the next row while this one is summed: rows of a class lie at
 * random places, and the hardware prefetcher only follows sequential runs. */
static inline void fl_prefetch(const void *p, ptrdiff_t bytes) {
#if defined(__GNUC__)
    const char *b = (const char *)p;
    for (ptrdiff_t k = 0; k < bytes; k += 64) __builtin_prefetch(b + k, 0, 3);
#else
    (void)p; (void)bytes;
#endif
}

#endif
