/* A real libmedlink client for integration tests: one ml_channel (DEALER,
 * mutual TLS with a node certificate of the test community) on a private
 * libuv loop that the test drives until something it waits for happens.
 * Replies (Accepted, Nack, AdminReply) and deliveries are kept in order;
 * with deliveries on, every delivered message is acknowledged at once (the
 * client stands for an agent with an instant disk). */
#ifndef ML_IT_CLIENT_H
#define ML_IT_CLIENT_H

#include <stddef.h>

#include <uv.h>

#include "harness.h"
#include "ml_channel.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_tls.h"

#define CLI_MAX 2048
enum { CLI_ACK = 0, CLI_IGNORE = 1, CLI_REFUSE = 2 };

typedef struct {
    uv_loop_t loop;
    void *zctx;
    ml_tls_ctx_t *tls;
    ml_channel_t *ch;
    char node[64];
    int deliveries;
    int answer; /* deliveries: CLI_ACK (default), CLI_IGNORE or CLI_REFUSE (a Nack) */
    int up;
    int downs;
    ml_envelope_t *replies[CLI_MAX]; /* everything that is not a delivery */
    int n;
    ml_envelope_t *got[CLI_MAX]; /* deliveries (routed kinds), acked */
    int n_got;
    uv_timer_t timer;
    uv_timer_t tick;
    int timed_out;
} cli_t;

/* Starts a client for node (max_record 0 = default; broker_id may be NULL)
 * without waiting for it to come up. */
void cli_start(cli_t *c, const h_world_t *w, const char *node, size_t max_record,
               const char *broker_id, int deliveries);
/* Starts a client pinned to the test broker and waits until it is up. */
void cli_open(cli_t *c, const h_world_t *w, const char *node, int deliveries);
void cli_close(cli_t *c);

/* Runs the loop until pred holds or ms pass; returns pred's last value.
 * The other open clients' loops run too (a turn every 10 ms), so that a
 * test with several clients in one thread keeps all their sessions alive
 * (heartbeats) while it waits on one. */
int cli_run_until(cli_t *c, int (*pred)(cli_t *, void *), void *arg, int ms);
int cli_is_up(cli_t *c, void *arg);
int cli_went_down(cli_t *c, void *arg);
/* *(int *)arg replies received. */
int cli_has_n(cli_t *c, void *arg);
/* *(int *)arg deliveries received. */
int cli_got_n(cli_t *c, void *arg);

/* Sends env and waits for one more reply (Accepted, Nack or AdminReply).
 * The reply stays valid until CLI_MAX more have come. */
ml_envelope_t *cli_send_wait(cli_t *c, ml_envelope_t *env);
/* Asserts reply is a Nack with code whose reason contains needle. */
void cli_expect_nack(const ml_envelope_t *reply, int code, const char *needle);
/* Asserts reply is an Accepted for id. */
void cli_expect_accepted(const ml_envelope_t *reply, const char *id);

/* A referral to fill in and send: env points into the struct. */
typedef struct {
    char id[ML_ULID_LEN + 1];
    Medlink__V1__Patient patient;
    Medlink__V1__Diagnosis diag;
    Medlink__V1__Diagnosis *diagp;
    Medlink__V1__Referral ref;
    ml_envelope_t env;
} cli_referral_t;

void cli_referral(cli_referral_t *r, const char *from, const char *to, const char *name,
                  int priority);

/* Sends an AdminRequest (op and its fields set by the caller; id, kind,
 * from and to filled here) and returns the AdminReply (asserted). */
const Medlink__V1__AdminReply *cli_admin(cli_t *c, Medlink__V1__AdminRequest *rq);

/* Asks the broker's dead-letter queue (OP_DLQ_LIST; ops is an OPS node's
 * client) every 100 ms, up to timeout_ms, until it lists message id (id
 * NULL: until it holds at least n letters); the loops of every open client
 * turn in between (a recipient that refuses or ignores its deliveries keeps
 * doing so). Returns that reply (valid as cli_send_wait's), or NULL on the
 * timeout. */
const Medlink__V1__AdminReply *cli_wait_dead_letters(cli_t *ops, const char *id, size_t n,
                                                     int timeout_ms);
/* The letter of message id in a DLQ reply, or NULL. */
const Medlink__V1__DeadLetter *cli_dead_letter(const Medlink__V1__AdminReply *rep, const char *id);

/* h_wait_quiet asked over ops (an OPS node's client, OP_STATUS) instead of
 * medlinkctl, with every open client's loop turning between the questions:
 * the form for a test whose recipient is an in-process client, which only
 * acknowledges while its loop runs. */
h_node_counts_t cli_wait_quiet(cli_t *ops, const char *node, long long delivered, int timeout_ms);

#endif
