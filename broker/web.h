/* medlinkd's web status page for ops staff (/, its assets, and the
 * throughput history it charts, /api/v1/throughput): plain HTML, CSS and a
 * little JavaScript compiled into the binary, no external resources,
 * Chinese and English labels. Loop thread only. */
#ifndef ML_BK_WEB_H
#define ML_BK_WEB_H

#include "http.h"

#include <stddef.h>

typedef struct ml_bk_web ml_bk_web_t;

/* One file of broker/web/, compiled in (web_assets.c, generated at build
 * time by cmake/embed_assets.cmake): its path ("/app.js"), its bytes with a
 * final NUL that len leaves out. */
typedef struct {
    const char *path;
    const unsigned char *data;
    size_t len;
} ml_bk_web_asset_t;

extern const ml_bk_web_asset_t ml_bk_web_assets[];
extern const size_t ml_bk_web_n_assets;

/* How many minutes of throughput /api/v1/throughput keeps. */
#define ML_BK_WEB_MINUTES 60

/* Allocates b->web. Returns 0 or ML_ENOMEM. */
int ml_bk_web_init(ml_broker_t *b);
void ml_bk_web_free(ml_broker_t *b);
/* From the housekeeping timer (every 250 ms): adds what the counters
 * accepted_total, delivered_total, refused_total and dead_total grew by
 * since the last call to the current minute's bucket of a ring of
 * ML_BK_WEB_MINUTES (fixed memory; minutes by the monotonic clock). O(1),
 * O(ML_BK_WEB_MINUTES) when minutes passed without a call. */
void ml_bk_web_tick(ml_broker_t *b);
/* The page, its assets and /api/v1/throughput. 0 when handled, 1 when the
 * path is not one of them. "/" is index.html with <html lang> set to "zh"
 * or "en": ?lang=zh|en, else Accept-Language (zh* preferred over en* gives
 * Chinese), else English. O(size of the asset). */
int ml_bk_web(ml_broker_t *b, const ml_http_req_t *rq, ml_http_resp_t *resp);

#endif
