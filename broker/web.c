/* The web status page (see web.h): the files of broker/web/, compiled in,
 * and the throughput history its chart draws. The page itself is static;
 * its JavaScript reads /api/v1/status, /api/v1/cases?overdue=1,
 * /api/v1/dlq (admin.c) and /api/v1/throughput (here) every 5 s. The one
 * thing the server decides for it is the language, written into
 * <html lang> so that the first render is already in the reader's
 * language. Nothing here touches patient data: the page shows what the API
 * shows, which carries none. */
#include "web.h"

#include <ctype.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ml_common.h"
#include "query.h"

#define S_MINUTE_MS 60000
/* The placeholder of broker/web/index.html that the language replaces. */
#define S_LANG_TOKEN "__ML_LANG__"

enum { S_ACCEPTED, S_DELIVERED, S_REFUSED, S_DEAD, S_SERIES };

static const char *const s_series_names[S_SERIES] = {"accepted", "delivered", "refused", "dead"};

struct ml_bk_web {
    /* All loop thread only. ring[head] is the current minute, the one of
     * the monotonic clock's minute number `minute`; the ring's other rows
     * are the minutes before it, oldest at head + 1. */
    uint64_t ring[ML_BK_WEB_MINUTES][S_SERIES];
    size_t head;
    int64_t minute;
    uint64_t last[S_SERIES]; /* the counters when they were last sampled */
};

static void s_counters(const ml_broker_t *b, uint64_t out[S_SERIES])
{
    ml_query_counters_t c;
    ml_query_counters(b, &c);
    out[S_ACCEPTED] = c.accepted_total;
    out[S_DELIVERED] = c.delivered_total;
    out[S_REFUSED] = c.refused_total;
    out[S_DEAD] = c.dead_total;
}

int ml_bk_web_init(ml_broker_t *b)
{
    ml_bk_web_t *w = calloc(1, sizeof *w);
    if (!w)
        return ML_ENOMEM;
    w->minute = ml_mono_ms() / S_MINUTE_MS;
    s_counters(b, w->last);
    ml_query_set_web(b, w);
    return 0;
}

void ml_bk_web_free(ml_broker_t *b)
{
    free(ml_query_web(b));
    ml_query_set_web(b, NULL);
}

/* Moves the ring on to the minute `minute`, emptying the rows it enters.
 * After an hour or more without a sample every row is empty. */
static void s_advance(ml_bk_web_t *w, int64_t minute)
{
    if (minute <= w->minute)
        return;
    int64_t steps = minute - w->minute;
    if (steps >= ML_BK_WEB_MINUTES) {
        memset(w->ring, 0, sizeof w->ring);
    } else {
        for (int64_t i = 0; i < steps; i++) {
            w->head = (w->head + 1) % ML_BK_WEB_MINUTES;
            memset(w->ring[w->head], 0, sizeof w->ring[w->head]);
        }
    }
    w->minute = minute;
}

void ml_bk_web_tick(ml_broker_t *b)
{
    ml_bk_web_t *w = ml_query_web(b);
    if (!w)
        return;
    s_advance(w, ml_mono_ms() / S_MINUTE_MS);
    uint64_t now[S_SERIES];
    s_counters(b, now);
    for (int k = 0; k < S_SERIES; k++) {
        /* The counters only grow; were one ever reset, its drop is not
         * counted as traffic. */
        if (now[k] > w->last[k])
            w->ring[w->head][k] += now[k] - w->last[k];
        w->last[k] = now[k];
    }
}

/* {"bucketSeconds":60,"now":"<Unix ms>","accepted":[...],...}: one number
 * a minute for the last ML_BK_WEB_MINUTES minutes, oldest first, the last
 * being the minute now running. now is a string, as int64 is in the rest of
 * the API (proto3 JSON); the counts of a minute are plain numbers. */
static int s_throughput(ml_broker_t *b, ml_http_resp_t *resp)
{
    ml_bk_web_tick(b); /* so that the minute now running is up to date */
    ml_bk_web_t *w = ml_query_web(b);
    ml_sbuf_printf(&resp->body, "{\"bucketSeconds\":%d,\"now\":\"%lld\"", S_MINUTE_MS / 1000,
                   (long long)ml_now_ms());
    for (int k = 0; k < S_SERIES; k++) {
        ml_sbuf_printf(&resp->body, ",\"%s\":[", s_series_names[k]);
        for (size_t i = 0; i < ML_BK_WEB_MINUTES; i++) {
            size_t row = (w->head + 1 + i) % ML_BK_WEB_MINUTES;
            ml_sbuf_printf(&resp->body, "%s%llu", i ? "," : "",
                           (unsigned long long)w->ring[row][k]);
        }
        ml_sbuf_puts(&resp->body, "]");
    }
    ml_sbuf_puts(&resp->body, "}\n");
    resp->status = 200;
    resp->content_type = "application/json";
    resp->cache_control = "no-store";
    return 0;
}

/* 1 when a language range of Accept-Language ("zh-CN", "zh", "en-GB")
 * starts with the two letters of lang, as a whole subtag. */
static int s_range_is(const char *tag, size_t len, const char *lang)
{
    return len >= 2 && tolower((unsigned char)tag[0]) == lang[0] &&
           tolower((unsigned char)tag[1]) == lang[1] && (len == 2 || tag[2] == '-');
}

/* The weight of one "q=0.8" parameter, in thousandths (RFC 9110 12.4.2:
 * at most three decimals); 1000 when there is none or it is malformed. */
static int s_qvalue(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    if (p >= end || (*p != 'q' && *p != 'Q'))
        return 1000;
    if (++p >= end || *p != '=')
        return 1000;
    if (++p >= end || *p != '0')
        return 1000; /* "1", "1.000", empty or not a number */
    p++;
    if (p < end && *p == '.')
        p++;
    int q = 0;
    for (int scale = 100; p < end && scale > 0 && isdigit((unsigned char)*p); p++, scale /= 10)
        q += (*p - '0') * scale;
    return q;
}

/* "zh" when Accept-Language prefers some zh* to every en* (and gives it a
 * weight above 0), else "en". The header is the peer's: read within its
 * bounds, never copied. */
static const char *s_lang_from_header(const char *h)
{
    int zh = 0, en = 0;
    const char *p = h;
    while (p && *p) {
        const char *item_end = strchr(p, ',');
        if (!item_end)
            item_end = p + strlen(p);
        while (p < item_end && (*p == ' ' || *p == '\t'))
            p++;
        const char *tag_end = p;
        while (tag_end < item_end && *tag_end != ';' && *tag_end != ' ' && *tag_end != '\t')
            tag_end++;
        const char *semi = memchr(tag_end, ';', (size_t)(item_end - tag_end));
        int q = semi ? s_qvalue(semi + 1, item_end) : 1000;
        size_t len = (size_t)(tag_end - p);
        if (s_range_is(p, len, "zh") && q > zh)
            zh = q;
        else if (s_range_is(p, len, "en") && q > en)
            en = q;
        p = *item_end ? item_end + 1 : item_end;
    }
    return zh > en ? "zh" : "en";
}

static const char *s_lang(const ml_http_req_t *rq)
{
    char v[8];
    if (rq->query && ml_http_query_get(rq->query, "lang", v, sizeof v) == 1) {
        if (strcmp(v, "zh") == 0 || strncmp(v, "zh-", 3) == 0)
            return "zh";
        if (strcmp(v, "en") == 0 || strncmp(v, "en-", 3) == 0)
            return "en";
    }
    return s_lang_from_header(rq->accept_language ? rq->accept_language : "");
}

static const ml_bk_web_asset_t *s_asset(const char *path)
{
    for (size_t i = 0; i < ml_bk_web_n_assets; i++)
        if (strcmp(ml_bk_web_assets[i].path, path) == 0)
            return &ml_bk_web_assets[i];
    return NULL;
}

static const char *s_content_type(const char *path)
{
    const char *dot = strrchr(path, '.');
    if (!dot)
        return "application/octet-stream";
    if (strcmp(dot, ".html") == 0)
        return "text/html; charset=utf-8";
    if (strcmp(dot, ".css") == 0)
        return "text/css; charset=utf-8";
    if (strcmp(dot, ".js") == 0)
        return "text/javascript; charset=utf-8";
    if (strcmp(dot, ".svg") == 0)
        return "image/svg+xml";
    return "application/octet-stream";
}

/* index.html with its language placeholder replaced. The page depends on
 * the request's headers and there is no Vary header to say so, so it is
 * not kept by caches; its assets are the same for everyone and kept five
 * minutes (a new medlinkd version shows within that). */
static int s_index(const ml_http_req_t *rq, const ml_bk_web_asset_t *a, ml_http_resp_t *resp)
{
    const char *html = (const char *)a->data;
    const char *at = strstr(html, S_LANG_TOKEN);
    if (at) {
        ml_sbuf_add(&resp->body, html, (size_t)(at - html));
        ml_sbuf_puts(&resp->body, s_lang(rq));
        ml_sbuf_puts(&resp->body, at + strlen(S_LANG_TOKEN));
    } else {
        ml_sbuf_add(&resp->body, html, a->len);
    }
    resp->status = 200;
    resp->content_type = s_content_type(a->path);
    resp->cache_control = "no-cache";
    return 0;
}

int ml_bk_web(ml_broker_t *b, const ml_http_req_t *rq, ml_http_resp_t *resp)
{
    const char *path = rq->path ? rq->path : "";
    if (strcmp(path, "/api/v1/throughput") == 0)
        return s_throughput(b, resp);
    if (strcmp(path, "/") == 0)
        path = "/index.html";
    const ml_bk_web_asset_t *a = s_asset(path);
    if (!a)
        return 1;
    if (strcmp(a->path, "/index.html") == 0)
        return s_index(rq, a, resp);
    ml_sbuf_add(&resp->body, a->data, a->len);
    resp->status = 200;
    resp->content_type = s_content_type(a->path);
    resp->cache_control = "public, max-age=300";
    return 0;
}
