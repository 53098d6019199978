/* broker/web.c without a server: the compiled-in assets, the language of
 * index.html from Accept-Language, and the throughput ring. */
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>
#include <jansson.h>

#include "broker_int.h"
#include "web.h"

static ml_broker_t *s_broker(void)
{
    ml_broker_t *b = calloc(1, sizeof *b);
    cr_assert_not_null(b);
    cr_assert_eq(ml_bk_web_init(b), 0);
    return b;
}

static void s_free(ml_broker_t *b)
{
    ml_bk_web_free(b);
    ml_bk_web_free(b); /* safe twice */
    free(b);
}

/* Runs ml_bk_web for path; returns its verdict, the response in *resp. */
static int s_get(ml_broker_t *b, const char *path, const char *accept, ml_http_resp_t *resp)
{
    ml_http_req_t rq = {
        .method = "GET", .path = path, .query = "", .accept_language = accept, .peer = ""};
    memset(resp, 0, sizeof *resp);
    ml_sbuf_init(&resp->body, ML_HTTP_BODY_MAX);
    return ml_bk_web(b, &rq, resp);
}

Test(web, assets_are_compiled_in_with_their_types)
{
    ml_broker_t *b = s_broker();
    ml_http_resp_t r;
    const char *paths[][2] = {{"/app.js", "text/javascript; charset=utf-8"},
                              {"/app.css", "text/css; charset=utf-8"},
                              {"/favicon.svg", "image/svg+xml"}};
    for (size_t i = 0; i < 3; i++) {
        cr_assert_eq(s_get(b, paths[i][0], "", &r), 0, "%s", paths[i][0]);
        cr_assert_eq(r.status, 200);
        cr_assert_str_eq(r.content_type, paths[i][1]);
        cr_assert_str_eq(r.cache_control, "public, max-age=300");
        cr_assert_gt(r.body.len, 100);
        ml_sbuf_free(&r.body);
    }
    /* Not ours: the server's 404 (or another handler). */
    cr_assert_eq(s_get(b, "/metrics", "", &r), 1);
    cr_assert_eq(s_get(b, "/app.js/", "", &r), 1);
    cr_assert_eq(s_get(b, "/../app.js", "", &r), 1);
    ml_sbuf_free(&r.body);
    s_free(b);
}

static void s_lang_is(ml_broker_t *b, const char *accept, const char *want)
{
    ml_http_resp_t r;
    cr_assert_eq(s_get(b, "/", accept, &r), 0);
    cr_assert_eq(r.status, 200);
    cr_assert_str_eq(r.content_type, "text/html; charset=utf-8");
    char needle[64];
    snprintf(needle, sizeof needle, "<html lang=\"%s\">", want);
    cr_assert(r.body.data && strstr(r.body.data, needle), "Accept-Language %s: want %s", accept,
              want);
    cr_assert_null(strstr(r.body.data, "__ML_LANG__"));
    ml_sbuf_free(&r.body);
}

Test(web, accept_language_chooses_chinese_or_english)
{
    ml_broker_t *b = s_broker();
    s_lang_is(b, "", "en");
    s_lang_is(b, "zh-CN,zh;q=0.9,en;q=0.8", "zh");
    s_lang_is(b, "zh", "zh");
    s_lang_is(b, "ZH-tw", "zh");
    s_lang_is(b, "en-US,en;q=0.9,zh;q=0.5", "en");
    s_lang_is(b, "fr-FR, zh-TW;q=0.4", "zh");
    s_lang_is(b, "zh;q=0, en;q=0.1", "en");
    s_lang_is(b, "zh;q=0", "en");
    s_lang_is(b, "en;q=0.5, zh;q=0.500", "en"); /* a tie stays English */
    s_lang_is(b, "en;q=0.4, zh;q=0.45", "zh");
    s_lang_is(b, "zhx, zhuang", "en"); /* not the zh subtag */
    s_lang_is(b, "*", "en");
    s_lang_is(b, ",,;;q=,zh;q=1.0", "zh");
    s_lang_is(b, "zh;q=", "zh"); /* a malformed weight counts as 1 */
    s_free(b);
}

static json_int_t s_sum(json_t *tp, const char *series)
{
    json_int_t sum = 0;
    json_t *v;
    size_t i;
    json_t *a = json_object_get(tp, series);
    cr_assert_eq(json_array_size(a), ML_BK_WEB_MINUTES, "%s", series);
    json_array_foreach(a, i, v) sum += json_integer_value(v);
    return sum;
}

static json_t *s_throughput(ml_broker_t *b)
{
    ml_http_resp_t r;
    cr_assert_eq(s_get(b, "/api/v1/throughput", "", &r), 0);
    cr_assert_eq(r.status, 200);
    cr_assert_str_eq(r.content_type, "application/json");
    json_error_t err;
    json_t *j = json_loads(r.body.data, 0, &err);
    cr_assert_not_null(j, "%s: %s", err.text, r.body.data);
    ml_sbuf_free(&r.body);
    return j;
}

Test(web, throughput_counts_what_the_counters_grew_by)
{
    ml_broker_t *b = s_broker();
    b->accepted_total = 5;
    b->delivered_total = 4;
    ml_bk_web_tick(b);
    b->accepted_total = 7; /* the handler samples too */
    b->refused_total = 1;
    b->dead_total = 2;
    json_t *tp = s_throughput(b);
    cr_assert_eq(json_integer_value(json_object_get(tp, "bucketSeconds")), 60);
    cr_assert(json_is_string(json_object_get(tp, "now")));
    cr_assert_eq(s_sum(tp, "accepted"), 7);
    cr_assert_eq(s_sum(tp, "delivered"), 4);
    cr_assert_eq(s_sum(tp, "refused"), 1);
    cr_assert_eq(s_sum(tp, "dead"), 2);
    json_decref(tp);
    /* Sampling again adds nothing; a counter that went down adds nothing. */
    ml_bk_web_tick(b);
    b->delivered_total = 1;
    ml_bk_web_tick(b);
    b->delivered_total = 3;
    tp = s_throughput(b);
    cr_assert_eq(s_sum(tp, "accepted"), 7);
    cr_assert_eq(s_sum(tp, "delivered"), 6);
    json_decref(tp);
    s_free(b);
}
