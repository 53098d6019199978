/* The security review's promises, against the real medlinkd and agents:
 *
 *   - a revoked node: the CRL is reloaded on SIGHUP without a restart, the
 *     node's live session is closed at once and its next handshake refused,
 *     while the others keep working;
 *   - the node registry and the ACL reload on SIGHUP too: a route opened, a
 *     node added, a node removed (its queued messages become dead letters);
 *     a broken file changes nothing. */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "client.h"
#include "harness.h"
#include "ml_common.h"

static h_world_t W;

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(security, .fini = s_teardown, .timeout = 300);

static void s_sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void s_sh(const char *fmt, ...)
{
    char cmd[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int st = -1;
    char *out = h_run(&st, "%s 2>&1", cmd);
    cr_assert_eq(st, 0, "%s failed:\n%s", cmd, out);
    free(out);
}

/* Sends SIGHUP and waits until the broker has logged the outcome. */
static void s_reload(const char *expect)
{
    int before = h_log_contains(&W, "broker.log", expect);
    cr_assert_eq(kill(W.broker, SIGHUP), 0);
    for (int waited = 0; waited < 10000; waited += 50) {
        if (h_log_contains(&W, "broker.log", expect) > before)
            return;
        h_sleep_ms(50);
    }
    cr_assert_fail("after SIGHUP the broker never logged \"%s\"", expect);
}

static void s_append_config(const char *text)
{
    char path[700];
    snprintf(path, sizeof path, "%s/medlinkd.ini", W.dir);
    FILE *f = fopen(path, "a");
    cr_assert(f);
    fputs(text, f);
    fclose(f);
}

/* Replaces the first occurrence of old in the broker's config file. */
static void s_edit_config(const char *old, const char *new_text)
{
    char path[700];
    snprintf(path, sizeof path, "%s/medlinkd.ini", W.dir);
    char *text = h_slurp(path);
    cr_assert_not_null(text);
    char *at = strstr(text, old);
    cr_assert(at, "\"%s\" is not in %s", old, path);
    FILE *f = fopen(path, "w");
    cr_assert(f);
    fwrite(text, 1, (size_t)(at - text), f);
    fputs(new_text, f);
    fputs(at + strlen(old), f);
    fclose(f);
    free(text);
}

static int s_wait_log(const char *log, const char *needle, int ms)
{
    for (int waited = 0; waited <= ms; waited += 50) {
        if (h_log_contains(&W, log, needle) > 0)
            return 1;
        h_sleep_ms(50);
    }
    return 0;
}

/* The broker's dead-letter queue holds exactly one message, whose reason
 * names `why`. */
static void s_expect_one_dead_letter(cli_t *ops, const char *why)
{
    Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
    rq.op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_LIST;
    const Medlink__V1__AdminReply *rep = cli_admin(ops, &rq);
    cr_assert_eq(rep->n_dead_letter, 1);
    cr_assert(strstr(rep->dead_letter[0]->reason, why), "%s", rep->dead_letter[0]->reason);
}

Test(security, revoked_node_closed_at_reload_and_refused_after)
{
    h_world_init(&W, "crl = pki/crl.pem\n");
    s_sh("'%s/deploy/pki.sh' --dir '%s' --crl", getenv("ML_SOURCE_DIR"), W.pki);
    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    h_agent_start(&W, H_XINZHAN);
    h_agent_start(&W, H_FENGLE);
    char *ref = h_referral_json(H_COUNTY, "Before Revocation", NULL);
    h_drop(&W, H_XINZHAN, "before.json", ref);
    free(ref);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 1, 20000), 1);

    /* Xinzhan's certificate is stolen: the community CA revokes it. */
    s_sh("'%s/deploy/pki.sh' --dir '%s' --revoke %s", getenv("ML_SOURCE_DIR"), W.pki, H_XINZHAN);
    s_reload("reloaded");
    cr_assert(s_wait_log("broker.log", "certificate revoked", 10000),
              "the revoked node's live session was not closed with its reason");
    cr_assert_geq(h_log_contains(&W, "broker.log", "closing " H_XINZHAN " session"), 1);
    /* Its agent reconnects and is refused at the handshake, again and again. */
    cr_assert(s_wait_log("broker.log", "refused session", 10000),
              "the next handshake was not refused");
    ref = h_referral_json(H_COUNTY, "After Revocation", NULL);
    h_drop(&W, H_XINZHAN, "after.json", ref);
    free(ref);
    /* Fengle, not revoked, keeps working meanwhile. */
    ref = h_referral_json(H_COUNTY, "Fengle Patient", NULL);
    h_drop(&W, H_FENGLE, "fengle.json", ref);
    free(ref);
    char *p = h_wait_json(&W, H_COUNTY, "inbox", "Fengle Patient", 20000);
    cr_assert(p, "a legitimate clinic stopped being served");
    free(p);
    h_sleep_ms(1500);
    p = h_find_json(&W, H_COUNTY, "inbox", "After Revocation");
    cr_assert_null(p, "a message from a revoked node was delivered");
    cr_assert_eq(h_count(&W, H_XINZHAN, "sent"), 1, "the revoked clinic's file must stay unsent");
    h_agent_stop(&W, H_FENGLE);
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

Test(security, registry_and_acl_reload)
{
    h_world_init(&W, "timer_ms = 100\n");
    /* A clinic that is not registered yet has a certificate already. */
    s_sh("'%s/deploy/pki.sh' --dir '%s' township.newtown.clinic", getenv("ML_SOURCE_DIR"), W.pki);
    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    cli_t clinic;
    cli_open(&clinic, &W, H_XINZHAN, 1);
    cli_referral_t r;
    /* Township -> township is forbidden by the ACL... */
    cli_referral(&r, H_XINZHAN, H_FENGLE, "Sideways Before", 0);
    cli_expect_nack(cli_send_wait(&clinic, &r.env), MEDLINK__V1__NACK_CODE__NACK_FORBIDDEN,
                    "forbidden route");
    /* ...and a message for Fengle (offline) waits in its queue. */
    s_edit_config("[acl TOWNSHIP_CLINIC]\n", "[acl TOWNSHIP_CLINIC]\nREFERRAL = TOWNSHIP_CLINIC\n");
    s_reload("reloaded");
    cli_referral(&r, H_XINZHAN, H_FENGLE, "Sideways After", 0);
    cli_expect_accepted(cli_send_wait(&clinic, &r.env), r.id);

    /* A broken file changes nothing. */
    s_append_config("\n[node broken]\nrole = NO_SUCH_ROLE\n");
    s_reload("reload refused");
    cli_referral(&r, H_XINZHAN, H_COUNTY, "Still Served", 0);
    cli_expect_accepted(cli_send_wait(&clinic, &r.env), r.id);

    /* Rewrite the file: the broken node out, the new clinic in, Fengle out. */
    s_edit_config("\n[node broken]\nrole = NO_SUCH_ROLE\n", "\n");
    s_edit_config("[node " H_FENGLE "]", "[node township.newtown.clinic]");
    s_reload("reloaded");
    cr_assert(s_wait_log("broker.log", "removed from the node registry", 10000),
              "the message queued for the removed node did not become a dead letter");
    cli_t ops;
    cli_open(&ops, &W, H_OPS, 0);
    s_expect_one_dead_letter(&ops, H_FENGLE);
    /* The new clinic may connect and refer now; Fengle may not. */
    cli_t newc;
    cli_open(&newc, &W, "township.newtown.clinic", 0);
    cli_referral(&r, "township.newtown.clinic", H_COUNTY, "New Clinic Patient", 0);
    cli_expect_accepted(cli_send_wait(&newc, &r.env), r.id);
    cli_referral(&r, H_XINZHAN, H_FENGLE, "To A Removed Node", 0);
    cli_expect_nack(cli_send_wait(&clinic, &r.env), MEDLINK__V1__NACK_CODE__NACK_UNKNOWN_NODE,
                    H_FENGLE);
    cli_close(&newc);
    cli_close(&ops);
    cli_close(&clinic);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

/* Every limit answers the peer with a reason and logs a line; none takes
 * the broker down, and the peers within their limits are still served. */
Test(security, limits_give_clear_errors)
{
    h_world_init(&W, "max_sessions = 4\nhandshakes_per_s = 3\nnode_rate = 20\n"
                     "node_queue_bytes = 1048576\n");
    h_broker_start(&W);
    cli_t clinic;
    cli_open(&clinic, &W, H_XINZHAN, 0);

    /* node_rate: 20 messages a second from one node; the rest are refused
     * as transient (the agent would send them again later). The first one
     * refused holds the rest ("held"), so that the sender's order is kept:
     * nothing behind it is taken until it comes again. */
    int accepted = 0, limited = 0, held = 0;
    static cli_referral_t rr[60];
    int first_refused = -1;
    for (int i = 0; i < 60; i++) {
        cli_referral(&rr[i], H_XINZHAN, H_COUNTY, "Rate Patient", 0);
        ml_envelope_t *rep = cli_send_wait(&clinic, &rr[i].env);
        if (rep->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED) {
            cr_assert_lt(first_refused, 0, "message %d accepted behind a refused one", i);
            accepted++;
        } else if (first_refused < 0) {
            cli_expect_nack(rep, MEDLINK__V1__NACK_CODE__NACK_RATE_LIMITED, "rate limit");
            first_refused = i;
            limited++;
        } else {
            cli_expect_nack(rep, MEDLINK__V1__NACK_CODE__NACK_RATE_LIMITED, "held");
            held++;
        }
    }
    cr_assert(accepted >= 20 && limited == 1 && held > 0, "accepted %d, rate-limited %d, held %d",
              accepted, limited, held);
    /* Sent again in order, after a second, they go through. */
    h_sleep_ms(1100);
    for (int i = first_refused; i < first_refused + 10; i++)
        cli_expect_accepted(cli_send_wait(&clinic, &rr[i].env), rr[i].id);

    /* node_queue_bytes: the county hospital is offline; once 1 MiB waits
     * for it, its senders are refused until it catches up. */
    h_sleep_ms(1100); /* a fresh second of node_rate */
    static char notes[300 * 1024];
    memset(notes, 'n', sizeof notes - 1);
    int quota = 0;
    for (int i = 0; i < 8 && !quota; i++) {
        cli_referral_t r;
        cli_referral(&r, H_XINZHAN, H_COUNTY, "Big Notes", 0);
        r.ref.notes = notes;
        ml_envelope_t *rep = cli_send_wait(&clinic, &r.env);
        if (rep->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_NACK) {
            cli_expect_nack(rep, MEDLINK__V1__NACK_CODE__NACK_RATE_LIMITED, "node_queue_bytes");
            quota = 1;
        }
        h_sleep_ms(60);
    }
    cr_assert(quota, "1 MiB queued for an offline node did not trigger the quota");

    /* max_sessions = 4 (the clinic's is one) and handshakes_per_s = 3:
     * of 8 new connections at once, some are turned away before TLS with a
     * plaintext reason, and the broker logs why. */
    cli_t many[8];
    const char *who[] = {H_COUNTY, H_FENGLE, H_CITY, H_OPS, H_READ_A, H_READ_B, H_COUNTY, H_OPS};
    for (int i = 0; i < 8; i++)
        cli_start(&many[i], &W, who[i], 0, H_BROKER, 0);
    cli_run_until(&many[0], cli_went_down, NULL, 1500);
    int up = 0;
    for (int i = 0; i < 8; i++)
        up += many[i].up;
    cr_assert_leq(up, 3, "%d sessions came up past max_sessions = 4", up);
    cr_assert(h_log_contains(&W, "broker.log", "refused new connection") > 0,
              "the broker did not log the refused connections");
    cr_assert(h_log_contains(&W, "broker.log", "max_sessions (4)") +
                      h_log_contains(&W, "broker.log", "too many new connections") >
                  0,
              "the log does not say which limit");
    for (int i = 0; i < 8; i++)
        cli_close(&many[i]);
    /* The clinic within its limits is still served. */
    h_sleep_ms(1100);
    cli_referral_t r;
    cli_referral(&r, H_XINZHAN, H_CITY, "Still Served", 0);
    cli_expect_accepted(cli_send_wait(&clinic, &r.env), r.id);
    cr_assert_eq(clinic.downs, 0);
    cli_close(&clinic);
    h_broker_stop(&W);
}

/* 1 if any SQLite file (database or WAL) under dir contains needle. */
static int s_sqlite_files_contain(const char *dir, const char *needle)
{
    int st = -1;
    char *out = h_run(&st,
                      "find '%s' -type f \\( -name '*.db' -o -name '*.db-wal' \\) "
                      "-exec grep -l -a -F -- '%s' {} + 2>/dev/null",
                      dir, needle);
    int found = out && *out;
    free(out);
    return found;
}

/* Patient data at rest: with store keys (the harness gives every store
 * one), no patient name appears in clear in any SQLite file of the broker
 * or the agents; rotating the broker's key loses nothing. */
Test(security, no_patient_name_in_clear_in_any_store_and_key_rotation)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_XINZHAN);
    const char *name = "Qinghua-Zhenzhen-Secret";
    /* One referral delivered and answered (timeline details with the name
     * in the notes), one waiting for the offline city hospital. */
    h_agent_start(&W, H_COUNTY);
    char *ref = h_referral_json(H_COUNTY, name, NULL);
    h_drop(&W, H_XINZHAN, "delivered.json", ref);
    free(ref);
    char *p = h_wait_json(&W, H_COUNTY, "inbox", name, 20000);
    cr_assert(p);
    free(p);
    char case_id[64];
    {
        char *text = h_slurp(p = h_find_json(&W, H_COUNTY, "inbox", name));
        const char *k = strstr(text, "\"caseId\": \"");
        cr_assert(k);
        snprintf(case_id, sizeof case_id, "%.26s", k + strlen("\"caseId\": \""));
        free(text);
        free(p);
    }
    char upd[1024];
    snprintf(upd, sizeof upd,
             "{\"to\": \"%s\", \"caseId\": \"%s\", \"referralUpdate\": {\"status\": "
             "\"REFERRAL_ACCEPTED\", \"notes\": \"bed ready for %s\"}}",
             H_XINZHAN, case_id, name);
    h_drop(&W, H_COUNTY, "accept.json", upd);
    p = h_wait_json(&W, H_XINZHAN, "inbox", "bed ready for", 20000);
    cr_assert(p);
    free(p);
    ref = h_referral_json(H_CITY, name, NULL);
    h_drop(&W, H_XINZHAN, "waiting.json", ref);
    free(ref);
    cr_assert_eq(h_wait_count(&W, H_XINZHAN, "sent", 2, 20000), 2);
    h_agent_stop(&W, H_COUNTY);
    h_agent_stop(&W, H_XINZHAN);
    h_broker_stop(&W);

    char data[700];
    snprintf(data, sizeof data, "%s/data", W.dir);
    cr_assert_not(s_sqlite_files_contain(data, name),
                  "a patient name is in clear in a SQLite file under %s", data);
    /* The check can see a name: the spool files (plaintext by design, the
     * hospital system's side) do contain it. */
    char spool[700];
    snprintf(spool, sizeof spool, "%s/spool", W.dir);
    int st = -1;
    char *out = h_run(&st, "grep -r -l -F -- '%s' '%s' | head -n 1", name, spool);
    cr_assert(out && *out, "the control search found nothing in the spool either");
    free(out);

    /* Rotation: a new current key, the old one kept as old; the waiting
     * referral (sealed under the old key) is still delivered. */
    char cfg[700];
    snprintf(cfg, sizeof cfg, "%s/medlinkd.ini", W.dir);
    out = h_run(&st,
                "cd '%s' && mv pki/broker-store.key pki/broker-store-1.key && "
                "(umask 077 && openssl rand -hex 32 > pki/broker-store.key) && "
                "sed -i 's|^store_key = pki/broker-store.key|store_key = pki/broker-store.key\\n"
                "store_old_keys = pki/broker-store-1.key|' '%s' 2>&1",
                W.dir, cfg);
    cr_assert_eq(st, 0, "rotation setup: %s", out);
    free(out);
    h_broker_start(&W);
    h_agent_start(&W, H_CITY);
    p = h_wait_json(&W, H_CITY, "inbox", name, 20000);
    cr_assert(p, "the message sealed under the old key was not delivered after rotation");
    free(p);
    h_agent_stop(&W, H_CITY);
    h_broker_stop(&W);
    cr_assert_geq(h_log_contains(&W, "broker.log", "sealed with AES-256-GCM under key"), 2);
}

/* A sealed envelope damaged on the broker's disk does not authenticate:
 * it becomes a dead letter with that reason (the queue behind it goes
 * on), never a delivery of damaged bytes. */
Test(security, envelope_damaged_at_rest_becomes_a_dead_letter)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_XINZHAN);
    char *ref = h_referral_json(H_COUNTY, "Damaged On Disk", NULL);
    h_drop(&W, H_XINZHAN, "a-damaged.json", ref); /* outbox files go in name order */
    free(ref);
    ref = h_referral_json(H_COUNTY, "Behind The Damaged One", NULL);
    h_drop(&W, H_XINZHAN, "b-behind.json", ref);
    free(ref);
    cr_assert_eq(h_wait_count(&W, H_XINZHAN, "sent", 2, 20000), 2);
    h_broker_stop(&W);
    char db[800];
    snprintf(db, sizeof db, "%s/data/broker/broker.db", W.dir);
    int st = -1;
    /* Change one byte in the middle of the first referral's sealed body,
     * in the segment file that holds it (store schema 5: the row names
     * the segment and the offset of the body's 16-byte record header). */
    char *out = h_run(&st,
                      "sqlite3 '%s' \"SELECT seg, off FROM messages WHERE seq = (SELECT "
                      "min(seq) FROM messages WHERE kind = 20)\" 2>&1",
                      db);
    cr_assert_eq(st, 0, "sqlite3: %s", out);
    unsigned seg = 0;
    long long off = -1;
    cr_assert_eq(sscanf(out, "%u|%lld", &seg, &off), 2, "sqlite3: %s", out);
    free(out);
    char segpath[900];
    snprintf(segpath, sizeof segpath, "%s-seg/%08u.seg", db, seg);
    FILE *f = fopen(segpath, "r+b");
    cr_assert(f, "cannot open %s", segpath);
    cr_assert_eq(fseek(f, (long)off + 16 + 100, SEEK_SET), 0);
    int c = fgetc(f);
    cr_assert_neq(c, EOF);
    cr_assert_eq(fseek(f, (long)off + 16 + 100, SEEK_SET), 0);
    cr_assert_neq(fputc(c ^ 0xff, f), EOF); /* always a different byte */
    cr_assert_eq(fclose(f), 0);
    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    char *p = h_wait_json(&W, H_COUNTY, "inbox", "Behind The Damaged One", 20000);
    cr_assert(p, "the message behind the damaged one was not delivered");
    free(p);
    cr_assert_null(h_find_json(&W, H_COUNTY, "inbox", "Damaged On Disk"));
    cli_t ops;
    cli_open(&ops, &W, H_OPS, 0);
    s_expect_one_dead_letter(&ops, "does not authenticate");
    cli_close(&ops);
    h_agent_stop(&W, H_COUNTY);
    h_agent_stop(&W, H_XINZHAN);
    h_broker_stop(&W);
}
