/* Backup and restore of broker.db, as docs/operations.md tells an operator
 * to do it, against the real medlinkd and agents:
 *
 *   - messages are queued for a hospital whose agent is offline;
 *   - `sqlite3 data/broker/broker.db ".backup copy.db"` runs while medlinkd
 *     runs (WAL mode: the copy is one consistent snapshot), and the broker
 *     goes on accepting messages after it;
 *   - the broker is stopped, its data folder replaced by a fresh one holding
 *     only the copy (same configuration and store_key), and started again;
 *   - the hospital's agent connects and receives exactly what was queued
 *     when the copy was taken: the messages accepted before the backup,
 *     none of those accepted after it. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <criterion/criterion.h>
#include <sqlite3.h>

#include "harness.h"

#define S_BEFORE 5 /* referrals accepted before the backup */
#define S_AFTER 3  /* referrals accepted after it */

static h_world_t W;

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(backup, .fini = s_teardown, .timeout = 600);

/* Drops n referrals from the township clinic to the county hospital, with
 * patients "<prefix> <i>", named <prefix>-<i>.json. */
static void s_drop_referrals(const char *prefix, int n)
{
    for (int i = 0; i < n; i++) {
        char patient[64], name[64];
        snprintf(patient, sizeof patient, "%s %d", prefix, i);
        snprintf(name, sizeof name, "%s-%d.json", prefix, i);
        char *ref = h_referral_json(H_COUNTY, patient, NULL);
        h_drop(&W, H_XINZHAN, name, ref);
        free(ref);
    }
}

/* One integer from a SQLite file, opened read-only. */
static long long s_query(const char *path, const char *sql)
{
    sqlite3 *db = NULL;
    cr_assert_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK, "open %s",
                 path);
    sqlite3_stmt *st = NULL;
    cr_assert_eq(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK, "%s", sql);
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW, "%s", sql);
    long long v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return v;
}

static int s_integrity_ok(const char *path)
{
    sqlite3 *db = NULL;
    cr_assert_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    sqlite3_stmt *st = NULL;
    cr_assert_eq(sqlite3_prepare_v2(db, "PRAGMA integrity_check", -1, &st, NULL), SQLITE_OK);
    int ok = sqlite3_step(st) == SQLITE_ROW &&
             strcmp((const char *)sqlite3_column_text(st, 0), "ok") == 0;
    sqlite3_finalize(st);
    sqlite3_close(db);
    return ok;
}

Test(backup, sqlite_backup_while_running_restores_queued_messages)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_XINZHAN);

    /* The county hospital is offline: what the clinic sends is queued in
     * broker.db. sent/ means the broker answered Accepted, which it does
     * only once the message is committed. */
    s_drop_referrals("Before Backup", S_BEFORE);
    cr_assert_eq(h_wait_count(&W, H_XINZHAN, "sent", S_BEFORE, 30000), S_BEFORE,
                 "the broker did not accept the first referrals");

    /* The backup, with the broker running. */
    char db[700], copy[700];
    snprintf(db, sizeof db, "%s/data/broker/broker.db", W.dir);
    snprintf(copy, sizeof copy, "%s/copy.db", W.dir);
    cr_assert_eq(kill(W.broker, 0), 0, "medlinkd is not running before the backup");
    int status = -1;
    char *out = h_run(&status,
                      "cd '%s' && sqlite3 data/broker/broker.db '.backup copy.db' 2>&1 &&"
                      " cp -R data/broker/broker.db-seg copy.db-seg 2>&1",
                      W.dir);
    cr_assert_eq(status, 0, "sqlite3 .backup failed: %s", out ? out : "");
    free(out);
    cr_assert_eq(kill(W.broker, 0), 0, "medlinkd stopped during the backup");
    cr_assert(s_integrity_ok(copy), "the copy fails PRAGMA integrity_check");
    cr_assert_eq(s_query(copy, "PRAGMA user_version"), s_query(db, "PRAGMA user_version"),
                 "the copy has another schema version");

    /* The broker goes on accepting after the backup. */
    s_drop_referrals("After Backup", S_AFTER);
    cr_assert_eq(h_wait_count(&W, H_XINZHAN, "sent", S_BEFORE + S_AFTER, 30000), S_BEFORE + S_AFTER,
                 "the broker did not accept referrals after the backup");

    /* Restore: stop, a fresh data folder with the copy as broker.db, start. */
    h_agent_stop(&W, H_XINZHAN);
    h_broker_stop(&W);
    char data[700], old[720], fresh[720];
    snprintf(data, sizeof data, "%s/data/broker", W.dir);
    snprintf(old, sizeof old, "%s/data/broker.lost", W.dir);
    cr_assert_eq(rename(data, old), 0, "cannot move the data folder aside");
    cr_assert_eq(mkdir(data, 0750), 0);
    snprintf(fresh, sizeof fresh, "%s/broker.db", data);
    /* Schema 5: the bodies are in the segment folder copied after the
     * database (docs/operations.md, "Online backup"). */
    out = h_run(&status, "cp '%s' '%s' && cp -R '%s-seg' '%s-seg' 2>&1", copy, fresh, copy, fresh);
    cr_assert_eq(status, 0, "cp: %s", out ? out : "");
    free(out);
    h_broker_start(&W);

    /* The hospital comes online and gets what was queued at the backup. */
    h_agent_start(&W, H_COUNTY);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", S_BEFORE, 30000), S_BEFORE,
                 "the restored broker did not deliver the referrals queued before the backup");
    for (int i = 0; i < S_BEFORE; i++) {
        char patient[64];
        snprintf(patient, sizeof patient, "\"Before Backup %d\"", i);
        char *p = h_find_json(&W, H_COUNTY, "inbox", patient);
        cr_assert(p, "referral of %s missing after the restore", patient);
        free(p);
    }
    /* Nothing accepted after the backup is in the copy: the restored broker
     * holds nothing more for the hospital and delivered exactly those. */
    h_node_counts_t q = h_wait_quiet(&W, H_COUNTY, S_BEFORE, 30000);
    cr_assert(q.queued == 0 && q.in_flight == 0 && q.delivered == S_BEFORE,
              "broker: %lld queued, %lld in flight, %lld delivered to %s", q.queued, q.in_flight,
              q.delivered, H_COUNTY);
    cr_assert_eq(h_count(&W, H_COUNTY, "inbox"), S_BEFORE, "more than the copy held arrived");
    char *after = h_find_json(&W, H_COUNTY, "inbox", "After Backup");
    cr_assert_null(after, "a referral accepted after the backup came from the copy: %s", after);
    cr_assert_eq(h_log_contains(&W, "broker.log", "schema version"), 0,
                 "the restored broker complained about the schema");
}
