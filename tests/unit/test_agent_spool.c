/* The agent's spool folder and store without a network: files dropped into
 * outbox/ become outbox rows and move to pending/, bad files land in
 * rejected/ with a reason, broker answers move files to sent/ or
 * rejected/, deliveries are stored once and written once to inbox/, and
 * start-up recovery finishes what a crash interrupted. Real SQLite files
 * and real folders in a temp dir. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <jansson.h>

#include "astore.h"
#include "ml_common.h"
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
