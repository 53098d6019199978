/* A log-line budget for one noisy source: at most ML_LOGLIMIT_BURST lines
 * per ML_LOGLIMIT_WINDOW_MS, the rest counted and said on the next line
 * that is logged. A peer refused at its rate limit for ever, or a port
 * scanner failing TLS handshakes, must not fill the disk with log lines
 * (about 600 bytes each), while the operator still learns how many were
 * left out. One limiter for every source, so that medlinkd's per-node
 * refusals and its ops listeners budget alike. Pure (the caller passes the
 * time), no allocation; one limiter belongs to one thread. */
#ifndef ML_LOGLIMIT_H
#define ML_LOGLIMIT_H

#include <stdint.h>

#define ML_LOGLIMIT_BURST 10
#define ML_LOGLIMIT_WINDOW_MS 60000

/* A source's budget. Zeroed is ready: its first window is taken to have
 * begun at time 0. */
typedef struct {
    int64_t window_at; /* ms the window began (the clock the caller passes) */
    uint32_t logged;   /* lines in this window */
    uint64_t dropped;  /* lines left out since the last one logged */
} ml_loglimit_t;

/* Asks to log one line at now (ms on a monotonic clock, ml_mono_ms). A
 * window of ML_LOGLIMIT_WINDOW_MS begins when now is that far past the
 * last one's start. Returns 1 when the line may be logged: *dropped is then
 * how many lines were left out before it, and that count starts again at
 * 0. Returns 0 when the window's ML_LOGLIMIT_BURST lines are spent: the
 * line is counted as left out and *dropped is not touched. O(1). */
int ml_loglimit_take(ml_loglimit_t *l, int64_t now, uint64_t *dropped);

#endif
