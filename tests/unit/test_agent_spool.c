/* The agent's spool folder and store without a network: files dropped into
 * outbox/ become outbox rows and move to pending/, bad files land in
 * rejected/ with a reason, broker answers move files to sent/ or
 * rejected/, deliveries are stored once and written once to inbox/, and
 * start-up recovery finishes what a crash interrupted. Real SQLite files
 * and real folders in a temp dir.
 *
 * Encryption at rest (suite astore_sealed): with store_key, no patient name
 * is found in the bytes of agent.db or its WAL, while a store without a key
 * shows it (so the search is known to work); a rotated keyring reads
 * everything; a store written in clear and then opened with a key reads its
 * old rows and no longer holds them in clear; a sealed value moved to
 * another row does not open; the [agent] keys and the start-up log. */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <jansson.h>
#include <sqlite3.h>
#include <uv.h>

#include "aconfig.h"
#include "agent.h"
#include "astore.h"
#include "ml_common.h"
#include "ml_crypt.h"
#include "ml_env.h"
#include "spool.h"
#include "support.h"

#define NODE "township.xinzhan.clinic"
#define COUNTY "county.zhaozhou.hospital"

static char s_dir[512];
static char s_spool[600];
static ml_astore_t *s_store;
static ml_spool_t *s_sp;

static void s_open(void)
{
    char err[512], db[700];
    snprintf(db, sizeof db, "%s/agent.db", s_dir);
    cr_assert_eq(ml_astore_open(db, &s_store, err, sizeof err), 0, "%s", err);
    ml_spool_config_t cfg = {s_spool, NODE, 4194304, s_store};
    cr_assert_eq(ml_spool_new(&cfg, &s_sp, err, sizeof err), 0, "%s", err);
}

static void s_close(void)
{
    ml_spool_destroy(&s_sp);
    ml_astore_destroy(&s_store);
}

static void s_setup(void)
{
    ml_log_set_level(ML_LOG_ERROR);
    ml_test_tmpdir(s_dir, sizeof s_dir);
    snprintf(s_spool, sizeof s_spool, "%s/spool", s_dir);
    s_open();
}

static void s_teardown(void)
{
    s_close();
    ml_test_sh("rm -rf '%s'", s_dir);
}

TestSuite(spool, .init = s_setup, .fini = s_teardown);

static void s_path(const char *sub, const char *name, char *out, size_t len)
{
    snprintf(out, len, "%s/%s/%s", s_spool, sub, name);
}

static int s_exists(const char *sub, const char *name)
{
    char p[1200];
    struct stat st;
    s_path(sub, name, p, sizeof p);
    return stat(p, &st) == 0;
}

static int s_count(const char *sub)
{
    char p[800];
    snprintf(p, sizeof p, "%s/%s", s_spool, sub);
    DIR *d = opendir(p);
    cr_assert(d, "no folder %s", p);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

/* Drops a file the way the hospital system is told to: temp name, rename. */
static void s_drop(const char *name, const char *content)
{
    char tmp[1200], dst[1200];
    snprintf(tmp, sizeof tmp, "%s/outbox/.%s.tmp", s_spool, name);
    s_path("outbox", name, dst, sizeof dst);
    cr_assert_eq(ml_write_file_atomic(tmp, content, strlen(content)), 0);
    cr_assert_eq(rename(tmp, dst), 0);
}

static char *s_referral(const char *patient)
{
    char *s = malloc(1024);
    snprintf(s, 1024,
             "{\"to\": \"%s\", \"priority\": \"PRIORITY_URGENT\", \"referral\": {"
             "\"patient\": {\"healthCardId\": \"130102195903127718\", \"name\": \"%s\", "
             "\"sex\": \"SEX_MALE\", \"birthDate\": \"1959-03-12\"}, "
             "\"reason\": \"chest pain\", \"diagnosis\": [{\"icd10\": \"I20.0\"}]}}",
             COUNTY, patient);
    return s;
}

static char *s_slurp(const char *sub, const char *name)
{
    char p[1200], *out = NULL;
    s_path(sub, name, p, sizeof p);
    if (ml_read_file(p, 1 << 20, &out, NULL) != 0)
        return NULL;
    return out;
}

typedef struct {
    int n;
    char id[8][64];
    char file[8][256];
    int state[8];
} rows_t;

static int s_row_cb(const ml_outbox_row_t *r, void *arg)
{
    rows_t *rows = arg;
    if (rows->n < 8) {
        snprintf(rows->id[rows->n], 64, "%s", r->id);
        snprintf(rows->file[rows->n], 256, "%s", r->file_name);
        rows->state[rows->n] = r->state;
    }
    rows->n++;
    return 0;
}

static rows_t s_pending(void)
{
    rows_t rows = {0};
    cr_assert_eq(ml_astore_outbox_pending(s_store, 0, 100, s_row_cb, &rows), 0);
    return rows;
}

static int64_t s_outbox_count(int state)
{
    int64_t n = -1;
    cr_assert_eq(ml_astore_outbox_count(s_store, state, &n), 0);
    return n;
}

Test(spool, creates_its_folders)
{
    const char *subs[] = {"outbox", "pending", "sent", "rejected", "inbox"};
    for (int i = 0; i < 5; i++) {
        char p[800];
        struct stat st;
        snprintf(p, sizeof p, "%s/%s", s_spool, subs[i]);
        cr_assert(stat(p, &st) == 0 && S_ISDIR(st.st_mode), "missing %s", p);
    }
}

Test(spool, valid_referral_is_stored_and_moved_to_pending)
{
    char *ref = s_referral("Zhang San");
    s_drop("referral-001.json", ref);
    free(ref);
    ml_spool_scan_stats_t st;
    cr_assert_eq(ml_spool_scan(s_sp, 100, &st), 0);
    cr_assert_eq(st.queued, 1);
    cr_assert_eq(st.rejected, 0);
    cr_assert(!s_exists("outbox", "referral-001.json"));
    cr_assert(s_exists("pending", "referral-001.json"));
    cr_assert_eq(s_outbox_count(ML_OUTBOX_PENDING), 1);

    /* The stored envelope carries what the agent filled in. */
    rows_t rows = s_pending();
    cr_assert_eq(rows.n, 1);
    cr_assert_str_eq(rows.file[0], "referral-001.json");
    cr_assert(ml_ulid_valid(rows.id[0]), "id %s", rows.id[0]);
}

static int s_env_cb(const ml_outbox_row_t *r, void *arg)
{
    ml_envelope_t **e = arg;
    cr_assert_eq(ml_env_unpack(r->envelope, r->envelope_len, e), 0);
    return 1;
}

Test(spool, filled_in_fields)
{
    char *ref = s_referral("Li Si");
    s_drop("r.json", ref);
    free(ref);
    cr_assert_eq(ml_spool_scan(s_sp, 100, NULL), 0);
    rows_t rows = s_pending();
    ml_envelope_t *e = NULL;
    cr_assert_eq(ml_astore_outbox_get(s_store, rows.id[0], s_env_cb, &e), 1);
    cr_assert_str_eq(e->from, NODE);
    cr_assert_str_eq(e->to, COUNTY);
    cr_assert_str_eq(e->case_id, e->id, "case id defaults to the message id");
    cr_assert_eq(e->kind, MEDLINK__V1__KIND__KIND_REFERRAL);
    cr_assert_eq(e->priority, MEDLINK__V1__PRIORITY__PRIORITY_URGENT);
    cr_assert_gt(e->created_at, 1700000000000LL);
    cr_assert_str_eq(e->referral->patient->name, "Li Si");
    ml_env_free(&e);
}

Test(spool, invalid_file_is_rejected_with_reason)
{
    s_drop("noname.json", "{\"to\": \"" COUNTY "\", \"referral\": {\"patient\": "
                          "{\"healthCardId\": \"1\"}, \"reason\": \"x\"}}");
    s_drop("garbage.json", "this is { not json");
    s_drop("other.json", "{\"from\": \"county.zhaozhou.hospital\", \"to\": \"" COUNTY
                         "\", \"referral\": {\"patient\": {\"healthCardId\": \"1\", "
                         "\"name\": \"A\"}, \"reason\": \"x\"}}");
    ml_spool_scan_stats_t st;
    cr_assert_eq(ml_spool_scan(s_sp, 100, &st), 0);
    cr_assert_eq(st.queued, 0);
    cr_assert_eq(st.rejected, 3);
    cr_assert_eq(s_outbox_count(-1), 0, "nothing invalid is stored");
    cr_assert_eq(s_count("outbox"), 0);
    cr_assert(s_exists("rejected", "noname.json"));
    char *why = s_slurp("rejected", "noname.json.error");
    cr_assert(why, "no .error");
    cr_assert(strstr(why, "referral.patient.name is required"), "reason: %s", why);
    free(why);
    why = s_slurp("rejected", "garbage.json.error");
    cr_assert(why && strlen(why) > 5, "no reason for garbage");
    free(why);
    why = s_slurp("rejected", "other.json.error");
    cr_assert(why && strstr(why, "from county.zhaozhou.hospital is not this node " NODE),
              "reason: %s", why);
    free(why);
}

Test(spool, ignored_names_stay_in_outbox)
{
    char *ref = s_referral("Hidden");
    char p[1200];
    s_path("outbox", ".hidden.json", p, sizeof p);
    ml_write_file_atomic(p, ref, strlen(ref));
    s_path("outbox", "half.json.tmp", p, sizeof p);
    ml_write_file_atomic(p, ref, strlen(ref));
    s_path("outbox", "notes.txt", p, sizeof p);
    ml_write_file_atomic(p, ref, strlen(ref));
    free(ref);
    ml_spool_scan_stats_t st;
    cr_assert_eq(ml_spool_scan(s_sp, 100, &st), 0);
    cr_assert_eq(st.queued + st.rejected, 0);
    cr_assert_eq(s_count("outbox"), 2);
    cr_assert(s_exists("outbox", ".hidden.json"));
}

Test(spool, accepted_moves_to_sent_and_nack_to_rejected)
{
    char *ref = s_referral("One");
    s_drop("one.json", ref);
    free(ref);
    ref = s_referral("Two");
    s_drop("two.json", ref);
    free(ref);
    cr_assert_eq(ml_spool_scan(s_sp, 100, NULL), 0);
    rows_t rows = s_pending();
    cr_assert_eq(rows.n, 2);
    const char *one = strcmp(rows.file[0], "one.json") == 0 ? rows.id[0] : rows.id[1];
    const char *two = strcmp(rows.file[0], "one.json") == 0 ? rows.id[1] : rows.id[0];
    ml_spool_result_t res[3] = {
        {one, 1, NULL},
        {two, 0, "NACK_FORBIDDEN: TOWNSHIP_CLINIC may not send REFERRAL to TOWNSHIP_CLINIC"},
        {"01ARZ3NDEKTSV4RRFFQ69G5FAV", 1, NULL}, /* unknown: ignored */
    };
    cr_assert_eq(ml_spool_settle(s_sp, res, 3), 0);
    cr_assert(s_exists("sent", "one.json"));
    cr_assert(!s_exists("pending", "one.json"));
    cr_assert(s_exists("rejected", "two.json"));
    cr_assert(!s_exists("pending", "two.json"));
    char *why = s_slurp("rejected", "two.json.error");
    cr_assert(why && strstr(why, "NACK_FORBIDDEN") && strstr(why, "TOWNSHIP_CLINIC"), "%s", why);
    free(why);
    cr_assert_eq(s_outbox_count(ML_OUTBOX_PENDING), 0);
    cr_assert_eq(s_outbox_count(ML_OUTBOX_ACCEPTED), 1);
    cr_assert_eq(s_outbox_count(ML_OUTBOX_REJECTED), 1);

    /* A duplicate Accepted later changes nothing. */
    cr_assert_eq(ml_spool_settle(s_sp, res, 1), 0);
    cr_assert_eq(s_outbox_count(ML_OUTBOX_ACCEPTED), 1);
    cr_assert(s_exists("sent", "one.json"));
}

Test(spool, accepted_with_pending_file_gone_writes_sent_from_store)
{
    char *ref = s_referral("Gone Away");
    s_drop("gone.json", ref);
    free(ref);
    cr_assert_eq(ml_spool_scan(s_sp, 100, NULL), 0);
    rows_t rows = s_pending();
    char p[1200];
    s_path("pending", "gone.json", p, sizeof p);
    cr_assert_eq(unlink(p), 0);
    ml_spool_result_t res = {rows.id[0], 1, NULL};
    cr_assert_eq(ml_spool_settle(s_sp, &res, 1), 0);
    char *sent = s_slurp("sent", "gone.json");
    cr_assert(sent, "sent/gone.json not written from the store");
    json_error_t jerr;
    json_t *j = json_loads(sent, 0, &jerr);
    cr_assert(j, "not JSON: %s", sent);
    cr_assert_str_eq(json_string_value(json_object_get(j, "id")), rows.id[0]);
    json_decref(j);
    free(sent);
}

Test(spool, reused_file_name_gets_the_message_id)
{
    char *ref = s_referral("First");
    s_drop("referral.json", ref);
    free(ref);
    cr_assert_eq(ml_spool_scan(s_sp, 100, NULL), 0);
    ref = s_referral("Second");
    s_drop("referral.json", ref);
    free(ref);
    cr_assert_eq(ml_spool_scan(s_sp, 100, NULL), 0);
    rows_t rows = s_pending();
    cr_assert_eq(rows.n, 2);
    cr_assert_str_eq(rows.file[0], "referral.json");
    char want[256];
    snprintf(want, sizeof want, "referral.%s.json", rows.id[1]);
    cr_assert_str_eq(rows.file[1], want);
    cr_assert(s_exists("pending", "referral.json"));
    cr_assert(s_exists("pending", want));
}

Test(spool, duplicate_id_in_file_is_rejected)
{
    const char *f = "{\"id\": \"01HZX3NDEKTSV4RRFFQ69G5FAV\", \"to\": \"" COUNTY
                    "\", \"referral\": {\"patient\": {\"healthCardId\": \"1\", \"name\": "
                    "\"A\"}, \"reason\": \"x\"}}";
    s_drop("a.json", f);
    cr_assert_eq(ml_spool_scan(s_sp, 100, NULL), 0);
    s_drop("b.json", f);
    ml_spool_scan_stats_t st;
    cr_assert_eq(ml_spool_scan(s_sp, 100, &st), 0);
    cr_assert_eq(st.rejected, 1);
    cr_assert_eq(s_outbox_count(-1), 1);
    char *why = s_slurp("rejected", "b.json.error");
    cr_assert(why && strstr(why, "already used"), "%s", why);
    free(why);
}

/* Packs a referral envelope as the broker would deliver it. */
static void s_delivery(const char *id, const char *patient, uint8_t **blob, size_t *len)
{
    Medlink__V1__Patient p = MEDLINK__V1__PATIENT__INIT;
    Medlink__V1__Referral r = MEDLINK__V1__REFERRAL__INIT;
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    p.name = (char *)patient;
    p.health_card_id = "130102195903127718";
    r.patient = &p;
    r.reason = "chest pain";
    e.id = (char *)id;
    e.case_id = (char *)id;
    e.kind = MEDLINK__V1__KIND__KIND_REFERRAL;
    e.from = "township.fengle.clinic";
    e.to = NODE;
    e.created_at = ml_now_ms();
    e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL;
    e.referral = &r;
    cr_assert_eq(ml_env_pack(&e, blob, len), 0);
}

Test(spool, inbox_dedupes_by_id_and_writes_one_file)
{
    char id1[ML_ULID_LEN + 1], id2[ML_ULID_LEN + 1];
    ml_ulid_new(id1);
    ml_ulid_new(id2);
    uint8_t *b1, *b2;
    size_t l1, l2;
    s_delivery(id1, "Wang Wu", &b1, &l1);
    s_delivery(id2, "Zhao Liu", &b2, &l2);
    ml_spool_msg_t m[3] = {
        {id1, id1, "township.fengle.clinic", MEDLINK__V1__KIND__KIND_REFERRAL, b1, l1, -1, 0},
        {id2, id2, "township.fengle.clinic", MEDLINK__V1__KIND__KIND_REFERRAL, b2, l2, -1, 0},
        {id1, id1, "township.fengle.clinic", MEDLINK__V1__KIND__KIND_REFERRAL, b1, l1, -1, 0},
    };
    cr_assert_eq(ml_spool_receive(s_sp, m, 3), 0);
    cr_assert_eq(m[0].inserted, 1);
    cr_assert_eq(m[1].inserted, 1);
    cr_assert_eq(m[2].inserted, 0, "same id in one batch is a duplicate");
    /* The broker resends after a reconnect. */
    cr_assert_eq(ml_spool_receive(s_sp, m, 1), 0);
    cr_assert_eq(m[0].inserted, 0);

    int64_t n = 0;
    cr_assert_eq(ml_astore_inbox_count(s_store, &n), 0);
    cr_assert_eq(n, 2);
    cr_assert_eq(s_count("inbox"), 2, "exactly one file per message");
    char name[64];
    snprintf(name, sizeof name, "%s.json", id1);
    char *text = s_slurp("inbox", name);
    cr_assert(text, "no inbox/%s", name);
    json_error_t jerr;
    json_t *j = json_loads(text, 0, &jerr);
    cr_assert(j, "inbox file is not JSON: %s", text);
    cr_assert_str_eq(json_string_value(json_object_get(j, "id")), id1);
    cr_assert_str_eq(json_string_value(json_object_get(j, "from")), "township.fengle.clinic");
    cr_assert_str_eq(json_string_value(json_object_get(
                         json_object_get(json_object_get(j, "referral"), "patient"), "name")),
                     "Wang Wu");
    json_decref(j);
    free(text);
    free(b1);
    free(b2);
}

static int s_unspooled_cb(const ml_inbox_row_t *r, void *arg)
{
    (*(int *)arg)++;
    return 0;
}

Test(spool, respool_after_crash_between_commit_and_file)
{
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    uint8_t *b;
    size_t l;
    s_delivery(id, "Crash Case", &b, &l);
    /* Simulate the crash: the row is committed, the file never written. */
    cr_assert_eq(ml_astore_begin(s_store), 0);
    cr_assert_eq(ml_astore_inbox_add(s_store, id, ml_now_ms(), id, "township.fengle.clinic",
                                     MEDLINK__V1__KIND__KIND_REFERRAL, b, l),
                 1);
    cr_assert_eq(ml_astore_commit(s_store), 0);
    free(b);
    cr_assert_eq(s_count("inbox"), 0);

    s_close();
    s_open();
    cr_assert_eq(ml_spool_recover(s_sp), 0);
    char name[64];
    snprintf(name, sizeof name, "%s.json", id);
    cr_assert(s_exists("inbox", name), "not re-spooled");
    cr_assert_eq(s_count("inbox"), 1);
    int n = 0;
    cr_assert_eq(ml_astore_inbox_unspooled(s_store, s_unspooled_cb, &n), 0);
    cr_assert_eq(n, 0, "row still marked unspooled");
}

Test(spool, recover_stores_pending_orphans_and_finishes_settled_moves)
{
    /* A file renamed into pending/ whose row never committed. */
    char *ref = s_referral("Orphan");
    char p[1200];
    s_path("pending", "orphan.json", p, sizeof p);
    cr_assert_eq(ml_write_file_atomic(p, ref, strlen(ref)), 0);
    /* A row accepted whose file never left pending/. */
    s_drop("done.json", ref);
    free(ref);
    cr_assert_eq(ml_spool_scan(s_sp, 100, NULL), 0);
    rows_t rows = s_pending();
    cr_assert_eq(rows.n, 1, "the orphan is not seen by a plain scan");
    cr_assert_eq(ml_astore_begin(s_store), 0);
    cr_assert_eq(ml_astore_outbox_settle(s_store, rows.id[0], ML_OUTBOX_ACCEPTED, NULL, 1), 1);
    cr_assert_eq(ml_astore_commit(s_store), 0);

    s_close();
    s_open();
    cr_assert_eq(ml_spool_recover(s_sp), 0);
    cr_assert(s_exists("sent", "done.json"), "settled move not finished");
    cr_assert(!s_exists("pending", "done.json"));
    cr_assert(s_exists("pending", "orphan.json"));
    rows = s_pending();
    cr_assert_eq(rows.n, 1);
    cr_assert_str_eq(rows.file[0], "orphan.json");
}

Test(spool, scan_batch_is_bounded)
{
    char *ref = s_referral("Many");
    for (int i = 0; i < 30; i++) {
        char name[64];
        snprintf(name, sizeof name, "m-%02d.json", i);
        s_drop(name, ref);
    }
    free(ref);
    ml_spool_scan_stats_t st;
    cr_assert_eq(ml_spool_scan(s_sp, 10, &st), 0);
    cr_assert_eq(st.queued, 10);
    cr_assert_eq(s_count("outbox"), 20);
    rows_t rows = s_pending();
    cr_assert_str_eq(rows.file[0], "m-00.json", "files are taken in name order");
    cr_assert_eq(ml_spool_scan(s_sp, 100, &st), 0);
    cr_assert_eq(st.queued, 20);
    cr_assert_eq(s_outbox_count(ML_OUTBOX_PENDING), 30);
}

/* ---- encryption at rest ---- */

/* Names that occur nowhere else, so that finding one in a file means the
 * patient data is there in clear. */
#define NAME_OUT "Ouyang Xiuying Q7ZP"
#define NAME_IN "Shangguan Wanrou K3VD"
/* A refusal reason may quote what a peer wrote. */
#define REASON "NACK_FORBIDDEN: Zhuge Liang 5XQ may not be referred there"

static char s_key_a[700], s_key_b[700];
static ml_keyring_t *s_keys;

static void s_open_with(const ml_keyring_t *keys)
{
    char err[512], db[700];
    snprintf(db, sizeof db, "%s/agent.db", s_dir);
    cr_assert_eq(ml_astore_open_sealed(db, keys, &s_store, err, sizeof err), 0, "%s", err);
    ml_spool_config_t cfg = {s_spool, NODE, 4194304, s_store};
    cr_assert_eq(ml_spool_new(&cfg, &s_sp, err, sizeof err), 0, "%s", err);
}

static void s_reopen(const ml_keyring_t *keys)
{
    s_close();
    s_open_with(keys);
}

/* Opening that is expected to fail: returns rc, err filled. */
static int s_open_fails(const ml_keyring_t *keys, char *err, size_t errlen)
{
    char db[700];
    ml_astore_t *st = NULL;
    snprintf(db, sizeof db, "%s/agent.db", s_dir);
    int rc = ml_astore_open_sealed(db, keys, &st, err, errlen);
    cr_assert_null(st);
    return rc;
}

static ml_keyring_t *s_ring(const char *current, const char *old)
{
    ml_keyring_t *kr = NULL;
    char err[512];
    const char *olds[1] = {old};
    cr_assert_eq(ml_keyring_load(current, olds, old ? 1 : 0, &kr, err, sizeof err), 0, "%s", err);
    return kr;
}

static void s_sealed_setup(void)
{
    char err[512];
    ml_log_set_level(ML_LOG_ERROR);
    ml_test_tmpdir(s_dir, sizeof s_dir);
    snprintf(s_spool, sizeof s_spool, "%s/spool", s_dir);
    snprintf(s_key_a, sizeof s_key_a, "%s/a.key", s_dir);
    snprintf(s_key_b, sizeof s_key_b, "%s/b.key", s_dir);
    cr_assert_eq(ml_keyring_generate_file(s_key_a, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ml_keyring_generate_file(s_key_b, err, sizeof err), 0, "%s", err);
    s_keys = s_ring(s_key_a, NULL);
    s_open_with(s_keys);
}

static void s_sealed_teardown(void)
{
    s_close();
    ml_keyring_destroy(&s_keys);
    ml_test_sh("rm -rf '%s'", s_dir);
}

TestSuite(astore_sealed, .init = s_sealed_setup, .fini = s_sealed_teardown);

/* 1 if needle occurs in the bytes of agent.db, agent.db-wal or
 * agent.db-journal (whichever exist). */
static int s_db_has(const char *needle)
{
    static const char *const sfx[] = {"", "-wal", "-journal", "-shm"};
    for (size_t i = 0; i < sizeof sfx / sizeof sfx[0]; i++) {
        char p[800], *data = NULL;
        size_t n = 0;
        snprintf(p, sizeof p, "%s/agent.db%s", s_dir, sfx[i]);
        if (access(p, F_OK) != 0)
            continue;
        cr_assert_eq(ml_read_file(p, 256u << 20, &data, &n), 0, "cannot read %s", p);
        int found = memmem(data, n, needle, strlen(needle)) != NULL;
        free(data);
        if (found)
            return 1;
    }
    return 0;
}

static size_t s_db_bytes(const char *sfx)
{
    char p[800];
    struct stat st;
    snprintf(p, sizeof p, "%s/agent.db%s", s_dir, sfx);
    return stat(p, &st) == 0 ? (size_t)st.st_size : 0;
}

/* What a test stored, to check it reads back. */
typedef struct {
    int n_out;
    char in_id[4][ML_ULID_LEN + 1];
    int n_in;
} traffic_t;

/* Stores patient data every way the spool does: three referral files
 * (outbox rows; one Accepted, one refused, one pending) and two
 * deliveries (inbox rows). */
static void s_traffic(traffic_t *t, const char *tag)
{
    char *ref = s_referral(NAME_OUT);
    for (int i = 0; i < 3; i++) {
        char name[64];
        snprintf(name, sizeof name, "%s-%d.json", tag, i);
        s_drop(name, ref);
    }
    free(ref);
    ml_spool_scan_stats_t st;
    cr_assert_eq(ml_spool_scan(s_sp, 100, &st), 0);
    cr_assert_eq(st.queued, 3);
    rows_t rows = s_pending();
    cr_assert_geq(rows.n, 3);
    ml_spool_result_t res[2] = {{rows.id[rows.n - 3], 1, NULL}, {rows.id[rows.n - 2], 0, REASON}};
    cr_assert_eq(ml_spool_settle(s_sp, res, 2), 0);
    t->n_out += 3;

    for (int i = 0; i < 2; i++) {
        char *id = t->in_id[t->n_in];
        uint8_t *b;
        size_t l;
        ml_ulid_new(id);
        s_delivery(id, NAME_IN, &b, &l);
        ml_spool_msg_t m = {
            id, id, "township.fengle.clinic", MEDLINK__V1__KIND__KIND_REFERRAL, b, l, -1, 0};
        cr_assert_eq(ml_spool_receive(s_sp, &m, 1), 0);
        cr_assert_eq(m.inserted, 1);
        free(b);
        t->n_in++;
    }
}

typedef struct {
    int rows;
    int names;
} names_t;

/* Counts outbox rows and those whose stored envelope names NAME_OUT. */
static int s_name_cb(const ml_outbox_row_t *r, void *arg)
{
    names_t *c = arg;
    ml_envelope_t *e = NULL;
    c->rows++;
    cr_assert_eq(ml_env_unpack(r->envelope, r->envelope_len, &e), 0, "row %s", r->id);
    if (e->referral && strcmp(e->referral->patient->name, NAME_OUT) == 0)
        c->names++;
    ml_env_free(&e);
    return 0;
}

static int s_in_name_cb(const ml_inbox_row_t *r, void *arg)
{
    ml_envelope_t *e = NULL;
    cr_assert_eq(ml_env_unpack(r->envelope, r->envelope_len, &e), 0, "row %s", r->id);
    cr_assert_str_eq(e->referral->patient->name, NAME_IN);
    cr_assert_str_eq(e->id, r->id);
    ml_env_free(&e);
    return 1;
}

static int s_reason_cb(const ml_outbox_row_t *r, void *arg)
{
    (void)arg;
    cr_assert_eq(r->state, ML_OUTBOX_REJECTED);
    cr_assert_str_eq(r->reason, REASON);
    return 1;
}

/* Everything t stored reads back as it was written. */
static void s_reads_back(const traffic_t *t)
{
    int64_t n = 0;
    cr_assert_eq(ml_astore_outbox_count(s_store, -1, &n), 0);
    cr_assert_eq(n, t->n_out);
    rows_t rows = {0};
    cr_assert_eq(ml_astore_outbox_pending(s_store, 0, 100, s_row_cb, &rows), 0);
    for (int i = 0; i < rows.n; i++) {
        names_t c = {0};
        cr_assert_eq(ml_astore_outbox_get(s_store, rows.id[i], s_name_cb, &c), 0);
        cr_assert_eq(c.names, 1);
    }
    /* Every row, settled ones included, through the file-name index. */
    names_t all = {0};
    char *files[] = {"a-0.json", "a-1.json", "a-2.json", "b-0.json", "b-1.json", "b-2.json"};
    for (int i = 0; i < t->n_out && i < 6; i++)
        cr_assert_eq(ml_astore_outbox_by_file(s_store, files[i], s_name_cb, &all), 0, "%s",
                     files[i]);
    cr_assert_eq(all.names, t->n_out < 6 ? t->n_out : 6);
    cr_assert_eq(ml_astore_outbox_by_file(s_store, "a-1.json", s_reason_cb, NULL), 1);
    cr_assert_eq(ml_astore_inbox_count(s_store, &n), 0);
    cr_assert_eq(n, t->n_in);
    for (int i = 0; i < t->n_in; i++)
        cr_assert_eq(ml_astore_inbox_get(s_store, t->in_id[i], s_in_name_cb, NULL), 1);
}

Test(spool, payloads_are_in_clear_without_a_key)
{
    /* The control for the tests below: the search finds what is there. */
    traffic_t t = {0};
    s_traffic(&t, "a");
    cr_assert(s_db_has(NAME_OUT), "the outbox envelope holds the name in clear");
    cr_assert(s_db_has(NAME_IN), "the inbox envelope holds the name in clear");
    cr_assert(s_db_has(REASON), "and the refusal reason");
    s_reads_back(&t);
}

Test(astore_sealed, no_patient_name_in_the_database_files)
{
    traffic_t t = {0};
    s_traffic(&t, "a");
    cr_assert_gt(s_db_bytes("-wal"), 0, "the rows are in the WAL, not yet checkpointed");
    cr_assert_not(s_db_has(NAME_OUT), "outbox envelope in clear in agent.db or its WAL");
    cr_assert_not(s_db_has(NAME_IN), "inbox envelope in clear in agent.db or its WAL");
    cr_assert_not(s_db_has("130102195903127718"), "health card number in clear");
    cr_assert_not(s_db_has("Zhuge Liang"), "refusal reason in clear");
    s_reads_back(&t);

    /* The spool is the hospital system's side: plaintext by design. */
    char *sent = s_slurp("sent", "a-0.json");
    cr_assert(sent && strstr(sent, NAME_OUT), "sent/a-0.json is the envelope as sent");
    free(sent);
    char name[64];
    snprintf(name, sizeof name, "%s.json", t.in_id[0]);
    char *in = s_slurp("inbox", name);
    cr_assert(in && strstr(in, NAME_IN));
    free(in);

    /* Closed: checkpointed into agent.db, the WAL gone. */
    s_close();
    cr_assert_gt(s_db_bytes(""), 0);
    cr_assert_not(s_db_has(NAME_OUT));
    cr_assert_not(s_db_has(NAME_IN));
    s_open_with(s_keys);
    s_reads_back(&t);
}

Test(astore_sealed, rotation_reads_everything_and_retires_the_old_key)
{
    traffic_t t = {0};
    s_traffic(&t, "a");
    ml_keyring_t *rotated = s_ring(s_key_b, s_key_a);
    ml_keyring_t *b_only = s_ring(s_key_b, NULL);
    ml_keyring_t *a_only = s_ring(s_key_a, NULL);

    /* A store sealed under A cannot be opened with B alone: refused at
     * open, naming A's key id, rather than failing message by message. */
    s_close();
    char err[512];
    cr_assert_eq(s_open_fails(b_only, err, sizeof err), ML_ECONFIG);
    cr_assert(strstr(err, ml_keyring_current_id(a_only)), "names the missing key: %s", err);
    cr_assert(strstr(err, "neither store_key nor in store_old_keys"), "%s", err);

    /* Rotation: B current, A listed as old. */
    s_open_with(rotated);
    s_reads_back(&t);
    s_traffic(&t, "b");
    s_reads_back(&t);
    cr_assert_not(s_db_has(NAME_OUT));

    /* The open under B re-sealed what A had sealed: A may go. */
    s_reopen(b_only);
    s_reads_back(&t);

    /* And now it is A that is not enough. */
    s_close();
    cr_assert_eq(s_open_fails(a_only, err, sizeof err), ML_ECONFIG);
    cr_assert(strstr(err, ml_keyring_current_id(b_only)), "%s", err);
    ml_keyring_destroy(&rotated);
    ml_keyring_destroy(&a_only);
    /* The store borrows its keyring: teardown closes it before freeing
     * s_keys. */
    ml_keyring_destroy(&s_keys);
    s_keys = b_only;
    s_open_with(s_keys);
    s_reads_back(&t);
}

Test(astore_sealed, store_written_in_clear_is_read_and_sealed_once_a_key_is_set)
{
    /* Start again without a key, as an agent did before store_key. */
    s_close();
    ml_test_sh("rm -rf '%s/agent.db' '%s/agent.db-wal' '%s/agent.db-shm' '%s'", s_dir, s_dir, s_dir,
               s_spool);
    s_open_with(NULL);
    traffic_t t = {0};
    s_traffic(&t, "a");
    s_close();
    cr_assert(s_db_has(NAME_OUT), "written in clear");
    cr_assert(s_db_has(NAME_IN));
    cr_assert(s_db_has("Zhuge Liang"));

    /* The key is configured: the old rows still read, and are sealed. */
    s_open_with(s_keys);
    s_reads_back(&t);
    cr_assert_not(s_db_has(NAME_OUT), "re-sealed, and the clear copy not left in a free page");
    cr_assert_not(s_db_has(NAME_IN));
    cr_assert_not(s_db_has("Zhuge Liang"));
    s_traffic(&t, "b");
    s_reads_back(&t);
    s_close();
    cr_assert_not(s_db_has(NAME_OUT));
    cr_assert_not(s_db_has(NAME_IN));

    /* Once sealed, an agent without the key refuses the store instead of
     * taking sealed bytes for envelopes. */
    char err[512];
    cr_assert_eq(s_open_fails(NULL, err, sizeof err), ML_ESTORE);
    cr_assert(strstr(err, "sealed") && strstr(err, "store_key"), "%s", err);
    s_open_with(s_keys);
    s_reads_back(&t);
}

Test(astore_sealed, value_moved_to_another_row_does_not_open)
{
    traffic_t t = {0};
    s_traffic(&t, "a");
    /* Someone with write access to agent.db swaps two inbox envelopes. */
    char db[700];
    sqlite3 *h = NULL;
    snprintf(db, sizeof db, "%s/agent.db", s_dir);
    cr_assert_eq(sqlite3_open(db, &h), SQLITE_OK);
    char sql[512];
    snprintf(sql, sizeof sql,
             "UPDATE inbox SET envelope = (SELECT envelope FROM inbox WHERE id = '%s') "
             "WHERE id = '%s'",
             t.in_id[1], t.in_id[0]);
    cr_assert_eq(sqlite3_exec(h, sql, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(h);
    cr_assert_eq(ml_astore_inbox_get(s_store, t.in_id[1], s_in_name_cb, NULL), 1);
    cr_assert_eq(ml_astore_inbox_get(s_store, t.in_id[0], s_in_name_cb, NULL), ML_ESTORE);
    cr_assert(strstr(ml_astore_errmsg(s_store), "does not authenticate"), "%s",
              ml_astore_errmsg(s_store));
    cr_assert(strstr(ml_astore_errmsg(s_store), t.in_id[0]), "names the row: %s",
              ml_astore_errmsg(s_store));
    /* The next good read clears the message. */
    cr_assert_eq(ml_astore_inbox_get(s_store, t.in_id[1], s_in_name_cb, NULL), 1);
    cr_assert_null(strstr(ml_astore_errmsg(s_store), "does not authenticate"));
}

static void s_write_ini(const char *path, const char *extra)
{
    char text[2048];
    snprintf(text, sizeof text,
             "[agent]\nnode_id = " NODE "\nbroker = tcp://127.0.0.1:1\nca = pki/ca.crt\n"
             "cert = pki/" NODE ".crt\nkey = pki/" NODE ".key\ndata_dir = data\n"
             "spool_dir = spool\n%s",
             extra);
    cr_assert_eq(ml_write_file_atomic(path, text, strlen(text)), 0);
}

Test(astore_sealed, config_keys)
{
    char ini[700], err[512];
    ml_aconfig_t cfg;
    snprintf(ini, sizeof ini, "%s/agent.ini", s_dir);

    s_write_ini(ini, "");
    cr_assert_eq(ml_aconfig_load(ini, &cfg, err, sizeof err), 0, "%s", err);
    cr_assert_null(cfg.store_key, "optional");
    cr_assert_eq(cfg.n_store_old_keys, 0);
    ml_aconfig_clear(&cfg);

    s_write_ini(ini, "store_key = keys/2026.key\n"
                     "store_old_keys = keys/2025.key  /etc/medlink/2024.key\n");
    cr_assert_eq(ml_aconfig_load(ini, &cfg, err, sizeof err), 0, "%s", err);
    char want[800];
    snprintf(want, sizeof want, "%s/keys/2026.key", s_dir);
    cr_assert_str_eq(cfg.store_key, want, "relative to the config file");
    cr_assert_eq(cfg.n_store_old_keys, 2);
    snprintf(want, sizeof want, "%s/keys/2025.key", s_dir);
    cr_assert_str_eq(cfg.store_old_keys[0], want);
    cr_assert_str_eq(cfg.store_old_keys[1], "/etc/medlink/2024.key");
    ml_aconfig_clear(&cfg);
    ml_aconfig_clear(&cfg);

    s_write_ini(ini, "store_old_keys = keys/2025.key\n");
    cr_assert_eq(ml_aconfig_load(ini, &cfg, err, sizeof err), ML_ECONFIG);
    cr_assert(strstr(err, "store_old_keys needs store_key"), "%s", err);
    cr_assert(strstr(err, ini), "names the file: %s", err);
}

/* Starts and stops a real agent (no broker listening) with stderr in a
 * file; returns ml_agent_new's rc and the log in *log (malloc'd). */
static int s_agent_start(const char *extra, char **log, char *err, size_t errlen)
{
    char ini[700], logp[700];
    static const char *const nodes[] = {NODE, NULL};
    char pki[700];
    snprintf(pki, sizeof pki, "%s/pki", s_dir);
    if (access(pki, F_OK) != 0) {
        cr_assert_eq(ml_mkdirs(pki), 0);
        ml_test_pki(pki, "Test Community CA", nodes);
    }
    snprintf(ini, sizeof ini, "%s/agent.ini", s_dir);
    snprintf(logp, sizeof logp, "%s/agent.log", s_dir);
    s_write_ini(ini, extra);
    ml_aconfig_t cfg;
    cr_assert_eq(ml_aconfig_load(ini, &cfg, err, errlen), 0, "%s", err);

    fflush(stderr);
    int saved = dup(2);
    int fd = open(logp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    cr_assert(saved >= 0 && fd >= 0);
    dup2(fd, 2);
    close(fd);
    ml_log_set_level(ML_LOG_INFO);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_agent_t *a = NULL;
    int rc = ml_agent_new(&loop, &cfg, &a, err, errlen);
    if (rc == 0) {
        ml_agent_stop(a);
        uv_run(&loop, UV_RUN_DEFAULT);
        ml_agent_destroy(&a);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    ml_log_set_level(ML_LOG_ERROR);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    ml_aconfig_clear(&cfg);
    cr_assert_eq(ml_read_file(logp, 1 << 20, log, NULL), 0);
    return rc;
}

Test(astore_sealed, agent_start_up_says_whether_payloads_are_sealed)
{
    char err[1024] = "", *log = NULL;
    s_close();
    cr_assert_eq(s_agent_start("", &log, err, sizeof err), 0, "%s", err);
    cr_assert(strstr(log, "no store_key: message payloads (patient data) are stored in clear"),
              "%s", log);
    cr_assert(strstr(log, " warn "), "a warning: %s", log);
    free(log);

    /* With a key, on the same data_dir (written in clear just now). */
    char extra[1600];
    snprintf(extra, sizeof extra, "store_key = %s\nstore_old_keys = %s\n", s_key_b, s_key_a);
    cr_assert_eq(s_agent_start(extra, &log, err, sizeof err), 0, "%s", err);
    ml_keyring_t *b = s_ring(s_key_b, NULL);
    char want[200];
    snprintf(want, sizeof want, "sealed with AES-256-GCM under key %s", ml_keyring_current_id(b));
    cr_assert(strstr(log, want), "%s", log);
    cr_assert_null(strstr(log, "stored in clear"), "%s", log);
    free(log);

    /* Back to no key: the sealed store is refused, with the reason. */
    cr_assert_eq(s_agent_start("", &log, err, sizeof err), ML_ESTORE);
    cr_assert(strstr(err, "store_key"), "%s", err);
    free(log);

    /* A key file others can read is refused before anything is opened. */
    cr_assert_eq(chmod(s_key_b, 0644), 0);
    cr_assert_neq(s_agent_start(extra, &log, err, sizeof err), 0);
    cr_assert(strstr(err, "chmod 600"), "%s", err);
    free(log);
    ml_keyring_destroy(&b);
    cr_assert_eq(chmod(s_key_b, 0600), 0);
    s_open_with(s_keys);
}

/* F1: a spool folder that is a symbolic link is refused at start (writes
 * into it would land wherever it points); one replaced by a link while the
 * agent runs is not followed (the folder opened at start is kept), and one
 * deleted and made again is followed to the new folder. */
Test(spool, f1_symlinked_spool_folder_refused)
{
    char elsewhere[700], p[1200], err[512];
    s_close();
    snprintf(elsewhere, sizeof elsewhere, "%s/elsewhere", s_dir);
    cr_assert_eq(mkdir(elsewhere, 0750), 0);
    snprintf(p, sizeof p, "%s/inbox", s_spool);
    cr_assert_eq(rmdir(p), 0);
    cr_assert_eq(symlink(elsewhere, p), 0);
    char db[700];
    snprintf(db, sizeof db, "%s/agent.db", s_dir);
    cr_assert_eq(ml_astore_open(db, &s_store, err, sizeof err), 0, "%s", err);
    ml_spool_config_t cfg = {s_spool, NODE, 4194304, s_store};
    cr_assert_eq(ml_spool_new(&cfg, &s_sp, err, sizeof err), ML_EIO);
    cr_assert(strstr(err, "inbox/") && strstr(err, "symbolic link"), "%s", err);
    cr_assert_null(s_sp);
    ml_astore_destroy(&s_store);
    cr_assert_eq(unlink(p), 0);
    s_open();

    /* outbox/ swapped for a link to elsewhere: a file there is not taken. */
    char old[1200];
    snprintf(p, sizeof p, "%s/outbox", s_spool);
    snprintf(old, sizeof old, "%s/outbox.old", s_spool);
    cr_assert_eq(rename(p, old), 0);
    cr_assert_eq(symlink(elsewhere, p), 0);
    char *ref = s_referral("Link Patient");
    char f[1200];
    snprintf(f, sizeof f, "%s/planted.json", elsewhere);
    cr_assert_eq(ml_write_file_atomic(f, ref, strlen(ref)), 0);
    ml_spool_scan_stats_t st;
    cr_assert_eq(ml_spool_scan(s_sp, 100, &st), 0);
    cr_assert_eq(st.queued, 0);
    cr_assert_eq(access(f, F_OK), 0, "the file behind the link was taken");

    /* outbox/ made again as a real folder: followed. */
    cr_assert_eq(unlink(p), 0);
    cr_assert_eq(mkdir(p, 0750), 0);
    s_drop("again.json", ref);
    free(ref);
    cr_assert_eq(ml_spool_scan(s_sp, 100, &st), 0);
    cr_assert_eq(st.queued, 1);
    cr_assert(s_exists("pending", "again.json"));
}
