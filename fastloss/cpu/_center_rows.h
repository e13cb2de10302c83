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

#if defined(__GNUC__)
#define FL_PREFETCH(p) __builtin_prefetch((p), 0, 3)
#else
#define FL_PREFETCH(p) ((void)(p))
#endif

/* `next` (the row summed after this one, or NULL) is prefetched one cache line
 * per cache line of this row: rows of a class lie at random places, which the
 * hardware prefetcher does not follow, and spreading the requests keeps them
 * within the core's miss buffers. */
#define FL_ACCUMULATE(NAME, CT, XT)                                                  \
    static FL_CLONES void NAME(double *restrict acc, const CT *restrict c,            \
                               const XT *restrict x, const XT *next, ptrdiff_t n) {   \
        const ptrdiff_t line = 64 / sizeof(XT);                                       \
        ptrdiff_t d = 0;                                                              \
        for (; d + line <= n; d += line) {                                            \
            if (next) FL_PREFETCH(next + d);                                        \
            for (ptrdiff_t k = d; k < d + line; k++)                                  \
                acc[k] += (double)c[k] - (double)x[k];                                \
        }                                                                             \
        for (; d < n; d++) acc[d] += (double)c[d] - (double)x[d];                     \
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

#endif
