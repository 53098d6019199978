/* medlinkd's web status page for ops staff (/, its assets, and the
 * throughput history it charts, /api/v1/throughput): plain HTML, CSS and a
 * little JavaScript compiled into the binary, no external resources,
 * Chinese and English labels. Loop thread only. */
#ifndef ML_BK_WEB_H
#define ML_BK_WEB_H

#include "http.h"

typedef struct ml_bk_web ml_bk_web_t;

/* Allocates b->web. Returns 0 or ML_ENOMEM. */
int ml_bk_web_init(ml_broker_t *b);
void ml_bk_web_free(ml_broker_t *b);
/* From the housekeeping timer (every 250 ms): samples the counters the
 * throughput chart shows. */
void ml_bk_web_tick(ml_broker_t *b);
/* The page, its assets and /api/v1/throughput. 0 when handled, 1 when the
 * path is not one of them. */
int ml_bk_web(ml_broker_t *b, const ml_http_req_t *rq, ml_http_resp_t *resp);

#endif
