/* Credit-based flow control (docs/protocol.md, "Credit") against a real
 * medlinkd on 127.0.0.1: the broker states each session's send window in
 * Welcome and restates it in every Accepted; the active senders share the
 * store backlog ([broker] store_backlog) between them; a sender that
 * ignores its window meets the hard limit (twice the backlog) as a
 * RATE_LIMITED refusal, and the broker goes on serving everyone. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "client.h"
#include "harness.h"

#define P_(x) MEDLINK__V1__ENVELOPE__PAYLOAD_##x
#define NACK_(x) MEDLINK__V1__NACK_CODE__NACK_##x

static h_world_t W;

/* The window of reply (an Accepted), asserted to be one. */
static uint32_t s_accepted_window(const ml_envelope_t *reply, uint64_t *bytes)
{
    cr_assert_eq(reply->payload_case, P_(ACCEPTED), "expected an Accepted");
    if (bytes)
        *bytes = reply->accepted->credit_bytes;
    return reply->accepted->credit_msgs;
}

static ml_envelope_t *s_send_referral(cli_t *c, const char *from)
{
    cli_referral_t r;
    cli_referral(&r, from, H_COUNTY, "Credit Patient", 0);
    ml_envelope_t *reply = cli_send_wait(c, &r.env);
    cli_expect_accepted(reply, r.id);
    return reply;
}

Test(credit, welcome_and_accepted_carry_a_window)
{
    h_world_init(&W, "max_credit = 500\n");
    h_broker_start(&W);
    cli_t c;
    cli_open(&c, &W, H_XINZHAN, 1);

    /* Welcome: a first window, at most ML_SUBMIT_CREDIT_WELCOME (64)
     * messages and at least one max_record (default 4 MiB) of bytes. */
    const Medlink__V1__Welcome *wl = ml_channel_welcome(c.ch);
    cr_assert(wl);
    cr_assert_gt(wl->credit_msgs, 0, "Welcome states no window");
    cr_assert_leq(wl->credit_msgs, 64);
    cr_assert_geq(wl->credit_bytes, 4u * 1024 * 1024);
    uint32_t cm;
    uint64_t cb;
    cr_assert_eq(ml_channel_credit(c.ch, &cm, &cb), 0);
    cr_assert_eq(cm, wl->credit_msgs);
    cr_assert_eq(cb, wl->credit_bytes);

    /* The only active sender: its share is the whole backlog, clamped to
     * max_credit, reached by doubling from the Welcome's window on each
     * Accepted (64 -> 128 -> 256 -> 500); the channel takes the window
     * from the Accepted. */
    uint64_t bytes;
    ml_envelope_t *reply = s_send_referral(&c, H_XINZHAN);
    cr_assert_eq(s_accepted_window(reply, &bytes), 2 * wl->credit_msgs);
    cr_assert_eq(bytes, 32u * 1024 * 1024);
    cr_assert_eq(s_accepted_window(s_send_referral(&c, H_XINZHAN), NULL), 4 * wl->credit_msgs);
    cr_assert_eq(s_accepted_window(s_send_referral(&c, H_XINZHAN), NULL), 500);
    cr_assert_eq(s_accepted_window(s_send_referral(&c, H_XINZHAN), NULL), 500);
    cr_assert_eq(ml_channel_credit(c.ch, &cm, &cb), 0);
    cr_assert_eq(cm, 500);
    cr_assert_eq(cb, 32u * 1024 * 1024);

    cli_close(&c);
    h_broker_stop(&W);
    h_world_fini(&W);
}

/* Ten senders: two clinics, each with its delivering session and four
 * without deliveries (the most a node keeps at once). */
#define S_SENDERS 10
#define S_BACKLOG 100

Test(credit, many_senders_share_the_backlog_within_budget)
{
    char ini[128];
    snprintf(ini, sizeof ini, "store_backlog = %d\n", S_BACKLOG);
    h_world_init(&W, ini);
    h_broker_start(&W);
    static cli_t c[S_SENDERS];
    const char *node[S_SENDERS];
    for (int i = 0; i < S_SENDERS; i++) {
        node[i] = i < S_SENDERS / 2 ? H_XINZHAN : H_FENGLE;
        cli_open(&c[i], &W, node[i], i == 0 || i == S_SENDERS / 2);
    }
    /* Each sends once: all are active. Then, while they still are (the
     * last 1-2 s count), the windows their Accepted state must sum to at
     * most the backlog. A slow machine may let the first ones age out
     * between the rounds (their share then grows): the rounds go again,
     * a few times, until one fits. */
    uint64_t sum = 0;
    uint32_t win[S_SENDERS];
    int fits = 0;
    for (int round = 0; round < 5 && !fits; round++) {
        for (int i = 0; i < S_SENDERS; i++)
            s_send_referral(&c[i], node[i]);
        sum = 0;
        for (int i = 0; i < S_SENDERS; i++) {
            win[i] = s_accepted_window(s_send_referral(&c[i], node[i]), NULL);
            cr_assert_geq(win[i], 1);
            sum += win[i];
        }
        fits = sum <= S_BACKLOG;
    }
    cr_assert(fits, "the %d senders' windows sum to %llu, over the backlog of %d", S_SENDERS,
              (unsigned long long)sum, S_BACKLOG);
    /* With all ten counted, the last sender's share is exactly a tenth. */
    cr_assert_eq(win[S_SENDERS - 1], S_BACKLOG / S_SENDERS);
    for (int i = 0; i < S_SENDERS; i++)
        cli_close(&c[i]);
    h_broker_stop(&W);
    h_world_fini(&W);
}

/* Replies since from: the ids they answer (Accepted ids and Nacks), and of
 * the Nacks, those refusing for the hard limit. */
typedef struct {
    int from;
    int answered;
    int backlog;
    int accepted;
} s_tally_t;

static void s_tally(const cli_t *c, s_tally_t *t)
{
    t->answered = t->backlog = t->accepted = 0;
    for (int i = t->from; i < c->n; i++) {
        const ml_envelope_t *e = c->replies[i];
        if (e->payload_case == P_(ACCEPTED)) {
            t->answered += (int)e->accepted->n_message_ids;
            t->accepted += (int)e->accepted->n_message_ids;
        } else if (e->payload_case == P_(NACK)) {
            t->answered++;
            if (e->nack->code == NACK_(RATE_LIMITED) && e->nack->reason &&
                strstr(e->nack->reason, "store backlog full"))
                t->backlog++;
        }
    }
}

#define S_BLAST 600

static int s_all_answered(cli_t *c, void *arg)
{
    s_tally_t *t = arg;
    s_tally(c, t);
    return t->answered >= S_BLAST;
}

Test(credit, sender_ignoring_its_window_gets_the_hard_limit_refusal)
{
    /* A backlog of 20: the hard limit is 40 puts waiting for the store. */
    h_world_init(&W, "store_backlog = 20\n");
    h_broker_start(&W);
    cli_t c;
    cli_open(&c, &W, H_XINZHAN, 1);
    /* Sent all at once, far past the window the Welcome stated. */
    s_tally_t t = {.from = c.n};
    for (int i = 0; i < S_BLAST; i++) {
        cli_referral_t r;
        cli_referral(&r, H_XINZHAN, H_COUNTY, "Blast Patient", 0);
        cr_assert_eq(ml_channel_send(c.ch, &r.env), 0);
    }
    cr_assert(cli_run_until(&c, s_all_answered, &t, 120000), "only %d of %d answered", t.answered,
              S_BLAST);
    cr_assert_gt(t.backlog, 0, "no \"store backlog full\" refusal for %d messages at once",
                 S_BLAST);
    cr_assert_gt(t.accepted, 0);

    /* The broker is still up and serving: a new session is welcomed and
     * its message accepted, and /metrics counts the refusals by reason. */
    cli_t d;
    cli_open(&d, &W, H_FENGLE, 1);
    s_send_referral(&d, H_FENGLE);
    int status = 0;
    char *body = NULL;
    size_t len = 0;
    cr_assert_eq(h_http_get(&W, "/metrics", &status, &body, &len), 0);
    cr_assert_eq(status, 200);
    const char *k = "medlink_refusals_total{code=\"RATE_LIMITED\",reason=\"backlog\"} ";
    const char *line = strstr(body, k);
    cr_assert(line, "no backlog refusal series in /metrics");
    long n = strtol(line + strlen(k), NULL, 10);
    cr_assert_eq(n, t.backlog, "/metrics counts %ld backlog refusals, the client got %d", n,
                 t.backlog);
    free(body);
    cli_close(&d);
    cli_close(&c);
    h_broker_stop(&W);
    h_world_fini(&W);
}
