/* The log-line budget of ml_loglimit.h: a fixed window, not a token
 * bucket, so that a source that is quiet for a minute gets its whole burst
 * back at once and the arithmetic needs no floating point. */
#include "ml_loglimit.h"

int ml_loglimit_take(ml_loglimit_t *l, int64_t now, uint64_t *dropped)
{
    if (now - l->window_at >= ML_LOGLIMIT_WINDOW_MS) {
        l->window_at = now;
        l->logged = 0;
    }
    if (l->logged >= ML_LOGLIMIT_BURST) {
        l->dropped++;
        return 0;
    }
    l->logged++;
    *dropped = l->dropped;
    l->dropped = 0;
    return 1;
}
