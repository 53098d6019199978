/* The integration tests' libmedlink client (client.h). */
#include "client.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>
#include <zmq.h>

#include "ml_common.h"

static void s_keep(ml_envelope_t **slot, const ml_envelope_t *env)
{
    /* env is borrowed: keep a copy. */
    uint8_t *buf;
    size_t len;
    cr_assert_eq(ml_env_pack(env, &buf, &len), 0);
    cr_assert_eq(ml_env_unpack(buf, len, slot), 0);
    free(buf);
}

static void s_on_env(ml_channel_t *ch, ml_envelope_t *env, void *arg)
{
    cli_t *c = arg;
    if (c->deliveries && ml_env_kind_is_routed(env->kind)) {
        if (c->n_got < CLI_MAX)
            s_keep(&c->got[c->n_got++], env);
        Medlink__V1__Ack ack = MEDLINK__V1__ACK__INIT;
        Medlink__V1__Nack nack = MEDLINK__V1__NACK__INIT;
        char *ids[1] = {env->id};
        char id[ML_ULID_LEN + 1];
        ml_ulid_new(id);
        ml_envelope_t a = MEDLINK__V1__ENVELOPE__INIT;
        a.id = id;
        a.from = c->node;
        a.to = H_BROKER;
        if (c->answer == CLI_ACK) {
            ack.n_message_ids = 1;
            ack.message_ids = ids;
            a.kind = MEDLINK__V1__KIND__KIND_ACK;
            a.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ACK;
            a.ack = &ack;
            ml_channel_send(ch, &a);
        } else if (c->answer == CLI_REFUSE) {
            nack.message_id = env->id;
            nack.code = MEDLINK__V1__NACK_CODE__NACK_REFUSED;
            nack.reason = "the local system cannot file this message";
            a.kind = MEDLINK__V1__KIND__KIND_NACK;
            a.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_NACK;
            a.nack = &nack;
            ml_channel_send(ch, &a);
        }
    } else if (c->n < CLI_MAX) {
        s_keep(&c->replies[c->n++], env);
    }
    uv_stop(&c->loop);
}

static void s_on_state(ml_channel_t *ch, int up, const char *reason, void *arg)
{
    cli_t *c = arg;
    c->up = up;
    if (!up)
        c->downs++;
    uv_stop(&c->loop);
}

static void s_timeout(uv_timer_t *t)
{
    cli_t *c = t->data;
    c->timed_out = 1;
    uv_stop(&c->loop);
}

/* Every open client, for the turns in cli_run_until. */
#define S_MAX_CLIENTS 32
static cli_t *s_open[S_MAX_CLIENTS];

static void s_tick(uv_timer_t *t)
{
    uv_stop(t->loop);
}

int cli_run_until(cli_t *c, int (*pred)(cli_t *, void *), void *arg, int ms)
{
    c->timed_out = 0;
    uv_timer_start(&c->timer, s_timeout, (uint64_t)ms, 0);
    uv_timer_start(&c->tick, s_tick, 10, 10);
    while (!pred(c, arg) && !c->timed_out) {
        uv_run(&c->loop, UV_RUN_DEFAULT);
        for (int i = 0; i < S_MAX_CLIENTS; i++)
            if (s_open[i] && s_open[i] != c)
                uv_run(&s_open[i]->loop, UV_RUN_NOWAIT);
    }
    uv_timer_stop(&c->tick);
    uv_timer_stop(&c->timer);
    return pred(c, arg);
}

int cli_is_up(cli_t *c, void *arg)
{
    return c->up;
}

int cli_went_down(cli_t *c, void *arg)
{
    return c->downs > 0;
}

int cli_has_n(cli_t *c, void *arg)
{
    return c->n >= *(int *)arg;
}

int cli_got_n(cli_t *c, void *arg)
{
    return c->n_got >= *(int *)arg;
}

void cli_start(cli_t *c, const h_world_t *w, const char *node, size_t max_record,
               const char *broker_id, int deliveries)
{
    memset(c, 0, sizeof *c);
    snprintf(c->node, sizeof c->node, "%s", node);
    c->deliveries = deliveries;
    uv_loop_init(&c->loop);
    uv_timer_init(&c->loop, &c->timer);
    uv_timer_init(&c->loop, &c->tick);
    c->timer.data = c;
    for (int i = 0; i < S_MAX_CLIENTS; i++) {
        if (!s_open[i]) {
            s_open[i] = c;
            break;
        }
    }
    c->zctx = zmq_ctx_new();
    char ca[700], crt[700], key[700], err[512];
    snprintf(ca, sizeof ca, "%s/ca.crt", w->pki);
    snprintf(crt, sizeof crt, "%s/%s.crt", w->pki, node);
    snprintf(key, sizeof key, "%s/%s.key", w->pki, node);
    ml_tls_config_t tc = {.ca_file = ca, .cert_file = crt, .key_file = key};
    cr_assert_eq(ml_tls_ctx_new(&tc, &c->tls, err, sizeof err), 0, "%s", err);
    ml_channel_config_t cc = {.endpoint = w->endpoint,
                              .tls = c->tls,
                              .node_id = node,
                              .broker_id = broker_id,
                              .software = "medlink-it-client",
                              .heartbeat_ms = 1000,
                              .max_record = max_record,
                              .deliveries = deliveries,
                              .on_envelope = s_on_env,
                              .on_state = s_on_state,
                              .arg = c};
    cr_assert_eq(ml_channel_new(&c->loop, c->zctx, &cc, &c->ch), 0);
}

void cli_open(cli_t *c, const h_world_t *w, const char *node, int deliveries)
{
    cli_start(c, w, node, 0, H_BROKER, deliveries);
    cr_assert(cli_run_until(c, cli_is_up, NULL, 10000), "client %s did not come up", node);
}

static void s_walk_close(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

void cli_close(cli_t *c)
{
    for (int i = 0; i < S_MAX_CLIENTS; i++)
        if (s_open[i] == c)
            s_open[i] = NULL;
    ml_channel_destroy(&c->ch);
    uv_walk(&c->loop, s_walk_close, NULL);
    /* s_on_state calls uv_stop as the channel goes down, so run until the
     * close callbacks have all been called. */
    while (uv_run(&c->loop, UV_RUN_DEFAULT) != 0)
        ;
    int rc = uv_loop_close(&c->loop);
    cr_assert_eq(rc, 0, "client loop still has handles: %s", uv_strerror(rc));
    ml_tls_ctx_destroy(&c->tls);
    zmq_ctx_term(c->zctx);
    for (int i = 0; i < c->n; i++)
        ml_env_free(&c->replies[i]);
    for (int i = 0; i < c->n_got; i++)
        ml_env_free(&c->got[i]);
}

ml_envelope_t *cli_send_wait(cli_t *c, ml_envelope_t *env)
{
    if (c->n >= CLI_MAX - 1) {
        /* A test polling the broker for a long time: earlier replies are
         * no longer looked at (a reply is valid until the next call). */
        for (int i = 0; i < c->n; i++)
            ml_env_free(&c->replies[i]);
        c->n = 0;
    }
    int want = c->n + 1;
    cr_assert_eq(ml_channel_send(c->ch, env), 0);
    cr_assert(cli_run_until(c, cli_has_n, &want, 10000), "no answer from the broker");
    return c->replies[want - 1];
}

void cli_expect_nack(const ml_envelope_t *reply, int code, const char *needle)
{
    cr_assert_eq(reply->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_NACK,
                 "expected a Nack, got payload %d", reply->payload_case);
    cr_assert_eq(reply->nack->code, code, "Nack code %d, want %d (%s)", reply->nack->code, code,
                 reply->nack->reason);
    cr_assert(strstr(reply->nack->reason, needle), "reason '%s' should mention '%s'",
              reply->nack->reason, needle);
}

void cli_expect_accepted(const ml_envelope_t *reply, const char *id)
{
    cr_assert_eq(reply->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED,
                 "expected Accepted for %s, got payload %d%s%s", id, reply->payload_case,
                 reply->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_NACK ? ": " : "",
                 reply->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_NACK ? reply->nack->reason
                                                                            : "");
    cr_assert_eq(reply->accepted->n_message_ids, 1);
    cr_assert_str_eq(reply->accepted->message_ids[0], id);
}

void cli_referral(cli_referral_t *r, const char *from, const char *to, const char *name,
                  int priority)
{
    memset(r, 0, sizeof *r);
    ml_ulid_new(r->id);
    medlink__v1__patient__init(&r->patient);
    r->patient.health_card_id = "130102198001011234";
    r->patient.name = (char *)name;
    medlink__v1__diagnosis__init(&r->diag);
    r->diag.icd10 = "I20.0";
    r->diagp = &r->diag;
    medlink__v1__referral__init(&r->ref);
    r->ref.patient = &r->patient;
    r->ref.reason = "chest pain";
    r->ref.n_diagnosis = 1;
    r->ref.diagnosis = &r->diagp;
    medlink__v1__envelope__init(&r->env);
    r->env.id = r->id;
    r->env.case_id = r->id;
    r->env.kind = MEDLINK__V1__KIND__KIND_REFERRAL;
    r->env.from = (char *)from;
    r->env.to = (char *)to;
    r->env.priority = priority;
    r->env.created_at = ml_now_ms();
    r->env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL;
    r->env.referral = &r->ref;
}

const Medlink__V1__AdminReply *cli_admin(cli_t *c, Medlink__V1__AdminRequest *rq)
{
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = id;
    e.kind = MEDLINK__V1__KIND__KIND_ADMIN_REQUEST;
    e.from = c->node;
    e.to = H_BROKER;
    e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REQUEST;
    e.admin_request = rq;
    ml_envelope_t *r = cli_send_wait(c, &e);
    cr_assert_eq(r->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REPLY,
                 "expected an AdminReply, got payload %d", r->payload_case);
    return r->admin_reply;
}

const Medlink__V1__AdminReply *cli_wait_dead_letters(cli_t *ops, const char *id, size_t n,
                                                     int timeout_ms)
{
    int64_t deadline = ml_mono_ms() + timeout_ms;
    for (;;) {
        Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
        rq.op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_LIST;
        const Medlink__V1__AdminReply *rep = cli_admin(ops, &rq);
        if (!id && rep->n_dead_letter >= n)
            return rep;
        for (size_t i = 0; id && i < rep->n_dead_letter; i++)
            if (strcmp(rep->dead_letter[i]->message_id, id) == 0)
                return rep;
        if (ml_mono_ms() >= deadline)
            return NULL;
        /* Not a sleep: the loops of every open client turn meanwhile, so
         * that the one refusing or ignoring deliveries does its part. */
        cli_run_until(ops, cli_got_n, (int[]){CLI_MAX + 1}, 100);
    }
}

const Medlink__V1__DeadLetter *cli_dead_letter(const Medlink__V1__AdminReply *rep, const char *id)
{
    for (size_t i = 0; rep && i < rep->n_dead_letter; i++)
        if (strcmp(rep->dead_letter[i]->message_id, id) == 0)
            return rep->dead_letter[i];
    return NULL;
}

h_node_counts_t cli_wait_quiet(cli_t *ops, const char *node, long long delivered, int timeout_ms)
{
    h_node_counts_t c = {-1, -1, -1};
    int64_t deadline = ml_mono_ms() + timeout_ms;
    for (;;) {
        Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
        rq.op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_STATUS;
        const Medlink__V1__AdminReply *rep = cli_admin(ops, &rq);
        const Medlink__V1__BrokerStatus *bs = rep->broker_status;
        cr_assert(bs, "OP_STATUS without a status: %s", rep->error);
        int found = 0;
        for (size_t i = 0; i < bs->n_node && !found; i++) {
            const Medlink__V1__NodeStatus *n = bs->node[i];
            if (strcmp(n->node_id, node) != 0)
                continue;
            c.queued = (long long)n->queue_depth;
            c.in_flight = (long long)n->in_flight;
            c.delivered = (long long)n->delivered;
            found = 1;
        }
        cr_assert(found, "OP_STATUS does not list %s", node);
        if ((c.queued == 0 && c.in_flight == 0 && c.delivered >= delivered) ||
            ml_mono_ms() >= deadline)
            return c;
        /* The loops of every open client turn meanwhile: an in-process
         * recipient receives and acknowledges what is in flight. */
        cli_run_until(ops, cli_got_n, (int[]){CLI_MAX + 1}, 100);
    }
}
