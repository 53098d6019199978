/* The web status page (see web.h). */
#include "web.h"

#include <stdlib.h>

#include "broker_int.h"

struct ml_bk_web {
    int unused;
};

int ml_bk_web_init(ml_broker_t *b)
{
    b->web = calloc(1, sizeof *b->web);
    return b->web ? 0 : ML_ENOMEM;
}

void ml_bk_web_free(ml_broker_t *b)
{
    free(b->web);
    b->web = NULL;
}

void ml_bk_web_tick(ml_broker_t *b)
{
    (void)b;
}

int ml_bk_web(ml_broker_t *b, const ml_http_req_t *rq, ml_http_resp_t *resp)
{
    (void)b;
    (void)rq;
    (void)resp;
    return 1;
}
