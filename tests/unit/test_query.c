/* broker/query.c without a running broker: the views it gives the ops
 * modules are the broker's state as admin.c and metrics.c read it before
 * they went through query.h (a node's oldest message counts its unacked
 * in-flight deliveries for status, not for the queue gauge; a session's
 * in-flight count is its node's only when it is the delivering one). */
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "broker_int.h"
#include "query.h"

typedef struct {
    ml_query_node_t v[4];
    size_t n;
} s_nodes_t;

static void s_node_cb(void *arg, const ml_query_node_t *n)
{
    s_nodes_t *k = arg;
    cr_assert_lt(k->n, 4);
    k->v[k->n++] = *n;
}

typedef struct {
    ml_query_session_t v[4];
    size_t n;
} s_sessions_t;

static void s_session_cb(void *arg, const ml_query_session_t *s)
{
    s_sessions_t *k = arg;
    cr_assert_lt(k->n, 4);
    k->v[k->n++] = *s;
}

static void s_push(ml_queue_t *q, int64_t seq, int64_t accepted_at)
{
    ml_qitem_t it;
    memset(&it, 0, sizeof it);
    it.seq = seq;
    it.accepted_at = accepted_at;
    it.priority = 1;
    cr_assert_eq(ml_queue_push(q, &it), 0);
}

Test(query, node_views_match_status_and_metrics)
{
    ml_broker_t *b = calloc(1, sizeof *b);
    ml_broker_config_t *cfg = calloc(1, sizeof *cfg);
    ml_nodestate_t *ns = calloc(2, sizeof *ns);
    ml_node_t nodes[2] = {{.id = "clinic-a", .role = ML_ROLE_TOWNSHIP_CLINIC},
                          {.id = "gone-b", .role = ML_ROLE_COUNTY_HOSPITAL}};
    ml_nodestate_t *list[2] = {&ns[0], &ns[1]};
    cr_assert(b && cfg && ns);
    b->cfg = cfg;
    b->nodes = list;
    b->n_nodes = 2;
    for (int i = 0; i < 2; i++) {
        ns[i].node = &nodes[i];
        ns[i].index = (uint32_t)i;
        ml_queue_init(&ns[i].queue);
    }
    /* Node 0: two queued (accepted at 2000 and 3000), an acked delivery
     * from 500 and an unacked one from 1000 in its window. */
    s_push(&ns[0].queue, 10, 2000);
    s_push(&ns[0].queue, 11, 3000);
    ml_inflight_t win[2];
    memset(win, 0, sizeof win);
    win[0].item.accepted_at = 500;
    win[0].acked = 1;
    win[1].item.accepted_at = 1000;
    ns[0].inflight = win;
    ns[0].if_len = 2;
    ns[0].n_inflight = 1;
    ns[0].online = 1;
    ns[0].last_seen = 4321;
    ns[0].delivered = 7;
    ns[0].opened = 3;
    ns[1].removed = 1;

    cr_assert_eq(ml_query_node_count(b), 2);
    s_nodes_t k = {.n = 0};
    ml_query_nodes(b, s_node_cb, &k);
    cr_assert_eq(k.n, 2, "removed nodes are listed too");
    cr_assert_eq(k.v[0].index, 0);
    cr_assert_str_eq(k.v[0].node->id, "clinic-a");
    cr_assert_eq(k.v[0].queued, 2);
    cr_assert_eq(k.v[0].queue_oldest_at, 2000, "the queue gauge sees the queue only");
    cr_assert_eq(k.v[0].in_flight, 1);
    cr_assert_eq(k.v[0].oldest_at, 1000, "status counts the unacked delivery, not the acked");
    cr_assert_eq(k.v[0].online, 1);
    cr_assert_eq(k.v[0].last_seen, 4321);
    cr_assert_eq(k.v[0].delivered, 7);
    cr_assert_eq(k.v[0].opened, 3);
    cr_assert_eq(k.v[0].removed, 0);
    cr_assert_eq(k.v[1].index, 1);
    cr_assert_eq(k.v[1].removed, 1);
    cr_assert_eq(k.v[1].queued, 0);
    cr_assert_eq(k.v[1].oldest_at, 0);

    for (int i = 0; i < 2; i++)
        ml_queue_close(&ns[i].queue);
    free(ns);
    free(cfg);
    free(b);
}

Test(query, session_views_and_find_by_serial)
{
    ml_broker_t *b = calloc(1, sizeof *b);
    ml_nodestate_t *ns = calloc(1, sizeof *ns);
    ml_session_t *s = calloc(3, sizeof *s);
    ml_node_t node = {.id = "ops-1", .role = ML_ROLE_OPS};
    cr_assert(b && ns && s);
    ns->node = &node;
    ns->n_inflight = 5;
    ns->deliver = &s[0];
    char peer[] = "ops-1";
    /* s[0] delivers for ops-1, s[1] is its side session (medlinkctl), s[2]
     * is still before Hello. The list is newest first. */
    s[0] = (ml_session_t){.state = S_READY, .serial = 1, .peer_id = peer, .ns = ns};
    s[1] = (ml_session_t){.state = S_READY, .serial = 2, .peer_id = peer, .ns = ns};
    s[2] = (ml_session_t){.state = S_AWAIT_HELLO, .serial = 3, .sink = 1};
    b->sessions = &s[2];
    s[2].next = &s[1];
    s[1].next = &s[0];

    s_sessions_t k = {.n = 0};
    ml_query_sessions(b, s_session_cb, &k);
    cr_assert_eq(k.n, 3);
    cr_assert_eq(k.v[0].state, ML_QUERY_SESSION_HANDSHAKE, "before Hello counts as handshake");
    cr_assert_eq(k.v[0].sink, 1);
    cr_assert_null(k.v[0].node_id);
    cr_assert_eq(k.v[0].in_flight, 0);
    cr_assert_eq(k.v[1].state, ML_QUERY_SESSION_READY);
    cr_assert_eq(k.v[1].in_flight, 0, "a side session has none of its node's deliveries");
    cr_assert_eq(k.v[2].in_flight, 5);
    cr_assert_eq(k.v[2].role, ML_ROLE_OPS);
    cr_assert_str_eq(k.v[2].node_id, "ops-1");

    cr_assert_eq(ml_query_session_find(b, 2), &s[1]);
    cr_assert_null(ml_query_session_find(b, 3), "only a ready session is found");
    s[1].state = S_CLOSED;
    cr_assert_null(ml_query_session_find(b, 2), "a closed one is gone");
    free(s);
    free(ns);
    free(b);
}
