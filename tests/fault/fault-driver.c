/* fault-driver: the hospital systems of a soak community. It stands for the
 * local systems of every clinic, hospital and reading centre of one test
 * world: it writes JSON (and DICOM studies) into the agents' outbox/ folders
 * the documented way (a temporary name, then a rename), reads what the
 * agents put into inbox/, and answers as a person at that site would, so
 * that the broker carries a steady mix of whole clinical workflows:
 *
 *   referral    clinic -> hospital; the hospital answers by the plan the
 *               referral names (A: accepted, scheduled, arrived, admitted,
 *               discharged, closed by the clinic; B: ... arrived, closed by
 *               the hospital; C: rejected; D: accepted, scheduled, no-show,
 *               rescheduled, arrived, closed by the clinic);
 *   imaging     clinic -> imaging.ct with 1-3 DICOM Part 10 objects written
 *               here; the reading centre checks the published study against
 *               its manifest and reports (I, a critical finding now and then,
 *               then closed by the clinic) or rejects it (J);
 *   down        hospital -> clinic; the clinic accepts, records the arrival,
 *               two follow-ups and completes (F), declines (X), or refers
 *               the patient back up with a linked referral (R).
 *
 * Each case carries a token ("Soak 000042") and its plan letter in its
 * content, so the answering side knows what to do without shared state on
 * disk. The driver only reacts to what reached inbox/, and it dedupes inbox
 * files by name (files are named by message id); a name that reappears with
 * another inode after it was read counts as a message spooled twice.
 *
 *   fault-driver --world DIR --hospital ID --clinics ID,ID --readers ID,ID
 *                --out DIR [--rate CASES_PER_S] [--duration S] [--drain S]
 *                [--idle S] [--seed N] [--mix R,I,T] [--big PERCENT]
 *
 * SIGUSR2 pauses opening new cases, and resumes it (answers go on).
 * SIGUSR1 ends the load phase early (no new cases; answers go on); the
 * driver exits once every case reached its planned end (0), or with 3 when
 * the drain time passed or nothing moved for the idle time. SIGTERM stops it at once (4). It writes
 * DIR/cases.tsv (token, kind, plan, case id, expected final state, done) and prints one line of
 * figures. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "ml_common.h"
#include "ml_imaging.h"

#define S_PATH 1024
#define S_MAX_NODES 16
#define S_SCAN_MS 100
#define S_DEFER_GIVE_UP_MS 60000

enum { R_CLINIC, R_HOSPITAL, R_READER };
enum { K_REF = 'R', K_IMG = 'I', K_DOWN = 'T' };

/* ---- small containers --------------------------------------------------- */

/* String -> int64 map, open addressing; keys are copied. */
typedef struct {
    char **keys;
    int64_t *vals;
    size_t cap, n;
} s_map_t;

static uint64_t s_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static void s_map_put(s_map_t *m, const char *key, int64_t val);

static void s_map_grow(s_map_t *m)
{
    s_map_t n = {calloc(m->cap ? m->cap * 2 : 256, sizeof(char *)),
                 calloc(m->cap ? m->cap * 2 : 256, sizeof(int64_t)), m->cap ? m->cap * 2 : 256, 0};
    if (!n.keys || !n.vals) {
        fprintf(stderr, "fault-driver: out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < m->cap; i++)
        if (m->keys[i]) {
            s_map_put(&n, m->keys[i], m->vals[i]);
            free(m->keys[i]);
        }
    free(m->keys);
    free(m->vals);
    *m = n;
}

/* Returns a pointer to the value for key, or NULL. */
static int64_t *s_map_get(const s_map_t *m, const char *key)
{
    if (!m->cap)
        return NULL;
    for (size_t i = s_hash(key) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        if (!m->keys[i])
            return NULL;
        if (strcmp(m->keys[i], key) == 0)
            return &m->vals[i];
    }
}

static void s_map_put(s_map_t *m, const char *key, int64_t val)
{
    int64_t *v = s_map_get(m, key);
    if (v) {
        *v = val;
        return;
    }
    if ((m->n + 1) * 2 > m->cap)
        s_map_grow(m);
    size_t i = s_hash(key) & (m->cap - 1);
    while (m->keys[i])
        i = (i + 1) & (m->cap - 1);
    m->keys[i] = strdup(key);
    m->vals[i] = val;
    m->n++;
}

/* ---- the world ---------------------------------------------------------- */

typedef struct {
    char id[64];
    int role;
    char spool[S_PATH + 80];
    s_map_t seen;     /* inbox names read -> inode */
    s_map_t deferred; /* inbox names waiting for their case -> first try (ms) */
    long files;       /* inbox files read */
} s_node_t;

typedef struct {
    int token;
    char kind; /* K_REF, K_IMG, K_DOWN */
    char plan;
    int prio; /* 0 routine, 1 urgent, 2 emergency */
    int from, to;
    int parent; /* down-transfer token a re-referral comes from, or 0 */
    char case_id[64];
    char study_uid[96];
    int done;
    int64_t done_ms;
    char last[64]; /* the last step seen, for the report of an unfinished case */
} s_case_t;

/* A file to drop into a node's outbox at due (monotonic ms). */
typedef struct {
    int64_t due;
    int node;
    char name[96];
    char *json;
} s_action_t;

static struct {
    char world[S_PATH];
    char out[S_PATH];
    s_node_t nodes[S_MAX_NODES];
    int n_nodes;
    int hospital;
    int clinics[S_MAX_NODES], n_clinics;
    double rate;
    int duration_s, drain_s, idle_s;
    int mix[3]; /* referral, imaging, down-transfer weights */
    int big_pct;
    unsigned seed;

    s_case_t *cases;
    int n_cases, cap_cases;
    s_map_t by_case; /* case id -> index in cases */

    s_action_t *heap;
    size_t n_heap, cap_heap;

    long respooled, study_bad, escalations, unknown, notices, dropped_files, gave_up;
    long studies_ok;
    FILE *log;
} G;

static volatile sig_atomic_t s_stop_load, s_stop_now, s_toggle_pause;

static void s_on_usr1(int sig)
{
    s_stop_load = 1;
}

static void s_on_usr2(int sig)
{
    s_toggle_pause = 1;
}

static void s_on_term(int sig)
{
    s_stop_now = 1;
}

static void s_die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "fault-driver: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static void s_logf(const char *fmt, ...)
{
    if (!G.log)
        return;
    char ts[40];
    ml_time_format(ml_now_ms(), ts, sizeof ts);
    fprintf(G.log, "%s ", ts);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(G.log, fmt, ap);
    va_end(ap);
    fputc('\n', G.log);
}

static unsigned s_rand(void)
{
    return (unsigned)rand_r(&G.seed);
}

/* A uniform integer in [lo, hi]. */
static int s_between(int lo, int hi)
{
    return lo + (int)(s_rand() % (unsigned)(hi - lo + 1));
}

static const char *const s_prio_name[3] = {"PRIORITY_ROUTINE", "PRIORITY_URGENT",
                                           "PRIORITY_EMERGENCY"};

static int s_prio_parse(const char *s)
{
    if (s && strcmp(s, "PRIORITY_URGENT") == 0)
        return 1;
    if (s && strcmp(s, "PRIORITY_EMERGENCY") == 0)
        return 2;
    return 0; /* absent: proto3 JSON leaves the default (ROUTINE) out */
}

static int s_node_by_id(const char *id)
{
    for (int i = 0; i < G.n_nodes; i++)
        if (id && strcmp(G.nodes[i].id, id) == 0)
            return i;
    return -1;
}

static int s_add_node(const char *id, int role)
{
    if (G.n_nodes == S_MAX_NODES)
        s_die("too many nodes");
    s_node_t *n = &G.nodes[G.n_nodes];
    snprintf(n->id, sizeof n->id, "%s", id);
    n->role = role;
    /* Through a local: G.world and n->spool are both inside G. */
    char spool[sizeof n->spool];
    snprintf(spool, sizeof spool, "%s/spool/%s", G.world, id);
    memcpy(n->spool, spool, sizeof spool);
    return G.n_nodes++;
}

/* ---- actions (a min-heap on due) ---------------------------------------- */

static void s_heap_swap(size_t a, size_t b)
{
    s_action_t t = G.heap[a];
    G.heap[a] = G.heap[b];
    G.heap[b] = t;
}

static void s_schedule(int64_t due, int node, const char *name, char *json)
{
    if (G.n_heap == G.cap_heap) {
        G.cap_heap = G.cap_heap ? G.cap_heap * 2 : 256;
        G.heap = realloc(G.heap, G.cap_heap * sizeof *G.heap);
        if (!G.heap)
            s_die("out of memory");
    }
    size_t i = G.n_heap++;
    G.heap[i] = (s_action_t){.due = due, .node = node, .json = json};
    snprintf(G.heap[i].name, sizeof G.heap[i].name, "%s", name);
    while (i > 0 && G.heap[(i - 1) / 2].due > G.heap[i].due) {
        s_heap_swap(i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
}

static s_action_t s_heap_pop(void)
{
    s_action_t top = G.heap[0];
    G.heap[0] = G.heap[--G.n_heap];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < G.n_heap && G.heap[l].due < G.heap[m].due)
            m = l;
        if (r < G.n_heap && G.heap[r].due < G.heap[m].due)
            m = r;
        if (m == i)
            break;
        s_heap_swap(i, m);
        i = m;
    }
    return top;
}

/* Writes content as outbox/name the way a hospital system is told to: a
 * hidden temporary name in the same folder, then a rename. */
static void s_drop(int node, const char *name, const char *content)
{
    char tmp[S_PATH + 128], dst[S_PATH + 128];
    snprintf(tmp, sizeof tmp, "%s/outbox/.%s.tmp", G.nodes[node].spool, name);
    snprintf(dst, sizeof dst, "%s/outbox/%s", G.nodes[node].spool, name);
    FILE *f = fopen(tmp, "w");
    if (!f || fputs(content, f) < 0 || fclose(f) != 0)
        s_die("cannot write %s: %s", tmp, strerror(errno));
    if (rename(tmp, dst) != 0)
        s_die("cannot rename %s: %s", tmp, strerror(errno));
    G.dropped_files++;
}

static char *s_fmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *s_fmt(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0)
        s_die("out of memory");
    va_end(ap);
    return s;
}

/* ---- cases -------------------------------------------------------------- */

static s_case_t *s_new_case(char kind, char plan, int prio, int from, int to)
{
    if (G.n_cases == G.cap_cases) {
        G.cap_cases = G.cap_cases ? G.cap_cases * 2 : 1024;
        G.cases = realloc(G.cases, (size_t)G.cap_cases * sizeof *G.cases);
        if (!G.cases)
            s_die("out of memory");
    }
    s_case_t *c = &G.cases[G.n_cases];
    memset(c, 0, sizeof *c);
    c->token = ++G.n_cases;
    c->kind = kind;
    c->plan = plan;
    c->prio = prio;
    c->from = from;
    c->to = to;
    snprintf(c->last, sizeof c->last, "created");
    return c;
}

static s_case_t *s_case_by_token(int token)
{
    return token >= 1 && token <= G.n_cases ? &G.cases[token - 1] : NULL;
}

static s_case_t *s_case_by_id(const char *case_id)
{
    int64_t *v = case_id ? s_map_get(&G.by_case, case_id) : NULL;
    return v ? &G.cases[*v] : NULL;
}

static void s_bind_case(s_case_t *c, const char *case_id)
{
    if (!case_id || !*case_id || c->case_id[0])
        return;
    snprintf(c->case_id, sizeof c->case_id, "%s", case_id);
    s_map_put(&G.by_case, case_id, c->token - 1);
}

static void s_done(s_case_t *c, const char *why)
{
    if (c->done)
        return;
    c->done = 1;
    c->done_ms = ml_mono_ms();
    snprintf(c->last, sizeof c->last, "%s", why);
    s_logf("case %06d %c%c %s done: %s", c->token, c->kind, c->plan, c->case_id, why);
}

static const char *s_expected_state(const s_case_t *c)
{
    switch (c->kind) {
    case K_REF:
        return c->plan == 'C' ? "REFERRAL_REJECTED" : "REFERRAL_CLOSED";
    case K_IMG:
        return c->plan == 'J' ? "IMAGING_REJECTED" : "IMAGING_CLOSED";
    default:
        return c->plan == 'X'   ? "DOWN_TRANSFER_DECLINED"
               : c->plan == 'R' ? "DOWN_TRANSFER_RE_REFERRED"
                                : "DOWN_TRANSFER_COMPLETED";
    }
}

/* The patient every message of case token names. */
static char *s_patient(int token)
{
    return s_fmt("{\"healthCardId\": \"1301021980%08d\", \"name\": \"Soak %06d\", "
                 "\"sex\": \"SEX_FEMALE\", \"birthDate\": \"1980-01-01\"}",
                 token, token);
}

static int s_token_of(json_t *payload)
{
    const char *name =
        json_string_value(json_object_get(json_object_get(payload, "patient"), "name"));
    int token = 0;
    if (!name || sscanf(name, "Soak %d", &token) != 1)
        return 0;
    return token;
}

static char __attribute__((unused)) s_plan_of(const char *text)
{
    const char *p = text ? strstr(text, "soak plan ") : NULL;
    return p ? p[10] : 0;
}

/* ---- opening cases ------------------------------------------------------ */

static char s_referral_plan(void)
{
    int r = s_between(0, 99);
    return r < 50 ? 'A' : r < 70 ? 'B' : r < 85 ? 'C' : 'D';
}

static int s_random_prio(void)
{
    int r = s_between(0, 99);
    return r < 60 ? 0 : r < 90 ? 1 : 2;
}

/* Queues a referral from clinic to the hospital (linked: the down-transfer
 * case it refers back up from, or NULL). */
static void s_open_referral(int clinic, int64_t due, const char *linked, int parent)
{
    s_case_t *c = s_new_case(K_REF, s_referral_plan(), s_random_prio(), clinic, G.hospital);
    c->parent = parent;
    char *patient = s_patient(c->token);
    char linkpart[128] = "";
    if (linked)
        snprintf(linkpart, sizeof linkpart, ", \"linkedCaseId\": \"%s\"", linked);
    char *json = s_fmt("{\"to\": \"%s\", \"priority\": \"%s\", \"referral\": {\"patient\": %s, "
                       "\"referringDoctor\": {\"name\": \"Dr. Soak\"}, \"reason\": \"soak plan "
                       "%c\", \"diagnosis\": [{\"icd10\": \"I20.0\", \"text\": \"Unstable "
                       "angina\"}]%s}}\n",
                       G.nodes[G.hospital].id, s_prio_name[c->prio], patient, c->plan, linkpart);
    free(patient);
    char name[64];
    snprintf(name, sizeof name, "ref-%06d.json", c->token);
    s_schedule(due, clinic, name, json);
    s_logf("case %06d R%c opened by %s (%s)%s%s", c->token, c->plan, G.nodes[clinic].id,
           s_prio_name[c->prio], linked ? " linked to " : "", linked ? linked : "");
}

/* Appends one explicit-VR little-endian element. */
typedef struct {
    uint8_t *b;
    size_t n, cap;
} s_buf_t;

static void s_put(s_buf_t *b, const void *p, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2;
        b->b = realloc(b->b, b->cap);
        if (!b->b)
            s_die("out of memory");
    }
    memcpy(b->b + b->n, p, n);
    b->n += n;
}

static void s_el(s_buf_t *b, uint16_t g, uint16_t e, const char *vr, const void *v, uint32_t len)
{
    uint8_t h[12] = {(uint8_t)g,        (uint8_t)(g >> 8), (uint8_t)e,
                     (uint8_t)(e >> 8), (uint8_t)vr[0],    (uint8_t)vr[1]};
    if (strcmp(vr, "OB") == 0 || strcmp(vr, "OW") == 0) {
        h[8] = (uint8_t)len;
        h[9] = (uint8_t)(len >> 8);
        h[10] = (uint8_t)(len >> 16);
        h[11] = (uint8_t)(len >> 24);
        s_put(b, h, 12);
    } else {
        h[6] = (uint8_t)len;
        h[7] = (uint8_t)(len >> 8);
        s_put(b, h, 8);
    }
    s_put(b, v, len);
}

static void s_el_str(s_buf_t *b, uint16_t g, uint16_t e, const char *vr, const char *s)
{
    char tmp[128];
    size_t n = strlen(s);
    memcpy(tmp, s, n);
    if (n % 2)
        tmp[n++] = strcmp(vr, "UI") == 0 ? '\0' : ' ';
    s_el(b, g, e, vr, tmp, (uint32_t)n);
}

/* Writes a DICOM Part 10 CT image of about pixels bytes (pseudo-random
 * pixel data) to path. */
static void s_write_dicom(const char *path, const char *study_uid, int token, int index,
                          size_t pixels)
{
    char sop[128], series[128];
    snprintf(sop, sizeof sop, "%s.%d", study_uid, 100 + index);
    snprintf(series, sizeof series, "%s.1", study_uid);
    s_buf_t b = {0};
    uint8_t zero[128] = {0};
    s_put(&b, zero, 128);
    s_put(&b, "DICM", 4);
    s_el_str(&b, 0x0002, 0x0002, "UI", "1.2.840.10008.5.1.4.1.1.2");
    s_el_str(&b, 0x0002, 0x0003, "UI", sop);
    s_el_str(&b, 0x0002, 0x0010, "UI", "1.2.840.10008.1.2.1");
    s_el_str(&b, 0x0008, 0x0016, "UI", "1.2.840.10008.5.1.4.1.1.2");
    s_el_str(&b, 0x0008, 0x0018, "UI", sop);
    s_el_str(&b, 0x0008, 0x0060, "CS", "CT");
    s_el_str(&b, 0x0010, 0x0010, "PN", "SOAK^PATIENT");
    s_el_str(&b, 0x0020, 0x000D, "UI", study_uid);
    s_el_str(&b, 0x0020, 0x000E, "UI", series);
    pixels &= ~(size_t)1;
    uint8_t *px = malloc(pixels);
    if (!px)
        s_die("out of memory");
    uint64_t x = 0x9E3779B97F4A7C15ull ^ ((uint64_t)token << 20) ^ (uint64_t)index;
    for (size_t i = 0; i < pixels; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        px[i] = (uint8_t)x;
    }
    s_el(&b, 0x7FE0, 0x0010, "OW", px, (uint32_t)pixels);
    free(px);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(b.b, 1, b.n, f) != b.n || fclose(f) != 0)
        s_die("cannot write %s", path);
    free(b.b);
}

/* Writes the study into outbox/NAME.d/ now (the folder first, as the
 * documentation asks) and drops NAME.json at once. */
static void s_open_imaging(int clinic)
{
    char plan = s_between(0, 99) < 85 ? 'I' : 'J';
    s_case_t *c = s_new_case(K_IMG, plan, s_random_prio(), clinic, -1);
    snprintf(c->study_uid, sizeof c->study_uid, "1.2.826.0.1.3680043.8.498.%d.%d", (int)getpid(),
             c->token);
    char dir[S_PATH + 64], path[S_PATH + 128];
    if (snprintf(dir, sizeof dir, "%s/outbox/img-%06d.d", G.nodes[clinic].spool, c->token) >=
        (int)sizeof dir)
        s_die("spool path too long: %s", G.nodes[clinic].spool);
    if (ml_mkdirs(dir) != 0)
        s_die("cannot make %s", dir);
    int objects = s_between(1, 3);
    int big = s_between(0, 99) < G.big_pct;
    size_t bytes = 0;
    for (int i = 0; i < objects; i++) {
        size_t px = big ? (size_t)s_between(512, 1536) * 1024 : (size_t)s_between(16, 96) * 1024;
        snprintf(path, sizeof path, "%s/IM%04d.dcm", dir, i + 1);
        s_write_dicom(path, c->study_uid, c->token, i + 1, px);
        bytes += px;
    }
    char *patient = s_patient(c->token);
    char *json = s_fmt("{\"to\": \"imaging.ct\", \"priority\": \"%s\", \"imagingConsult\": "
                       "{\"patient\": %s, \"requestingDoctor\": {\"name\": \"Dr. Soak\"}, "
                       "\"bodyPart\": \"CHEST\", \"clinicalQuestion\": \"soak plan %c\"}}\n",
                       s_prio_name[c->prio], patient, c->plan);
    free(patient);
    char name[64];
    snprintf(name, sizeof name, "img-%06d.json", c->token);
    s_drop(clinic, name, json);
    free(json);
    s_logf("case %06d I%c opened by %s (%s, %d object(s), %zu bytes)", c->token, c->plan,
           G.nodes[clinic].id, s_prio_name[c->prio], objects, bytes);
}

static void s_open_down(int clinic)
{
    int r = s_between(0, 99);
    char plan = r < 70 ? 'F' : r < 85 ? 'X' : 'R';
    s_case_t *c = s_new_case(K_DOWN, plan, s_random_prio(), G.hospital, clinic);
    char *patient = s_patient(c->token);
    char *json = s_fmt("{\"to\": \"%s\", \"priority\": \"%s\", \"downTransfer\": {\"patient\": %s, "
                       "\"dischargingDoctor\": {\"name\": \"Dr. Soak\"}, \"phase\": "
                       "\"POST_OPERATIVE\", \"dischargeSummary\": \"soak plan %c\", "
                       "\"rehabPlan\": \"Physiotherapy twice weekly\", \"familyDoctorTeam\": "
                       "\"Soak team 1\"}}\n",
                       G.nodes[clinic].id, s_prio_name[c->prio], patient, c->plan);
    free(patient);
    char name[64];
    snprintf(name, sizeof name, "down-%06d.json", c->token);
    s_drop(G.hospital, name, json);
    free(json);
    s_logf("case %06d T%c opened by %s to %s (%s)", c->token, c->plan, G.nodes[G.hospital].id,
           G.nodes[clinic].id, s_prio_name[c->prio]);
}

static void s_open_random(void)
{
    int total = G.mix[0] + G.mix[1] + G.mix[2];
    int r = s_between(0, total - 1);
    int clinic = G.clinics[s_between(0, G.n_clinics - 1)];
    if (r < G.mix[0])
        s_open_referral(clinic, ml_mono_ms(), NULL, 0);
    else if (r < G.mix[0] + G.mix[1])
        s_open_imaging(clinic);
    else
        s_open_down(clinic);
}

/* ---- answering ---------------------------------------------------------- */

/* Queues the steps of a case from node to peer, each a little after the
 * one before (a person does not answer all at once). */
static int64_t s_step(int64_t at, int node, const s_case_t *c, int step, const char *payload)
{
    at += s_between(30, 600);
    char name[64];
    snprintf(name, sizeof name, "c%06d-%02d.json", c->token, step);
    const char *to = NULL;
    if (c->kind == K_REF)
        to = node == c->from ? G.nodes[c->to].id : G.nodes[c->from].id;
    else if (c->kind == K_IMG)
        to = node == c->from ? G.nodes[c->to].id : G.nodes[c->from].id;
    else
        to = node == c->from ? G.nodes[c->to].id : G.nodes[c->from].id;
    char *json = s_fmt("{\"to\": \"%s\", \"caseId\": \"%s\", \"priority\": \"%s\", %s}\n", to,
                       c->case_id, s_prio_name[c->prio], payload);
    s_schedule(at, node, name, json);
    return at;
}

static void s_hospital_answers(s_case_t *c)
{
    int64_t at = ml_mono_ms();
    int h = c->to, k = 0;
    char sched[128];
    snprintf(sched, sizeof sched,
             "\"referralUpdate\": {\"status\": \"REFERRAL_SCHEDULED\", \"scheduledAt\": "
             "\"%" PRId64 "\", \"department\": \"Cardiology\"}",
             ml_now_ms() + 86400000);
    switch (c->plan) {
    case 'A':
        at = s_step(at, h, c, ++k, "\"referralUpdate\": {\"status\": \"REFERRAL_ACCEPTED\"}");
        at = s_step(at, h, c, ++k, sched);
        at = s_step(at, h, c, ++k, "\"referralUpdate\": {\"status\": \"REFERRAL_ARRIVED\"}");
        at = s_step(at, h, c, ++k, "\"referralUpdate\": {\"status\": \"REFERRAL_ADMITTED\"}");
        s_step(at, h, c, ++k,
               "\"referralUpdate\": {\"status\": \"REFERRAL_DISCHARGED\", \"outcomeSummary\": "
               "\"recovered\"}");
        break;
    case 'B':
        at = s_step(at, h, c, ++k, "\"referralUpdate\": {\"status\": \"REFERRAL_ACCEPTED\"}");
        at = s_step(at, h, c, ++k, sched);
        at = s_step(at, h, c, ++k, "\"referralUpdate\": {\"status\": \"REFERRAL_ARRIVED\"}");
        s_step(at, h, c, ++k, "\"referralUpdate\": {\"status\": \"REFERRAL_CLOSED\"}");
        break;
    case 'C':
        s_step(at, h, c, ++k,
               "\"referralUpdate\": {\"status\": \"REFERRAL_REJECTED\", \"reason\": \"no bed\"}");
        break;
    default: /* 'D' */
        at = s_step(at, h, c, ++k, "\"referralUpdate\": {\"status\": \"REFERRAL_ACCEPTED\"}");
        at = s_step(at, h, c, ++k, sched);
        at = s_step(at, h, c, ++k, "\"referralUpdate\": {\"status\": \"REFERRAL_NO_SHOW\"}");
        at = s_step(at, h, c, ++k, sched);
        s_step(at, h, c, ++k, "\"referralUpdate\": {\"status\": \"REFERRAL_ARRIVED\"}");
        break;
    }
}

static void s_clinic_down_answers(s_case_t *c)
{
    int64_t at = ml_mono_ms();
    int t = c->to, k = 0;
    switch (c->plan) {
    case 'X':
        s_step(at, t, c, ++k,
               "\"downTransferUpdate\": {\"status\": \"DOWN_TRANSFER_DECLINED\", \"reason\": "
               "\"no team available\"}");
        break;
    case 'R':
        at = s_step(at, t, c, ++k,
                    "\"downTransferUpdate\": {\"status\": \"DOWN_TRANSFER_ACCEPTED\"}");
        at = s_step(at, t, c, ++k,
                    "\"downTransferUpdate\": {\"status\": \"DOWN_TRANSFER_ARRIVED\"}");
        s_open_referral(t, at + s_between(30, 600), c->case_id, c->token);
        break;
    default: /* 'F' */
        at = s_step(at, t, c, ++k,
                    "\"downTransferUpdate\": {\"status\": \"DOWN_TRANSFER_ACCEPTED\"}");
        at = s_step(at, t, c, ++k,
                    "\"downTransferUpdate\": {\"status\": \"DOWN_TRANSFER_ARRIVED\"}");
        at = s_step(at, t, c, ++k,
                    "\"downTransferUpdate\": {\"status\": \"DOWN_TRANSFER_FOLLOW_UP\", "
                    "\"followUpNumber\": 1}");
        at = s_step(at, t, c, ++k,
                    "\"downTransferUpdate\": {\"status\": \"DOWN_TRANSFER_FOLLOW_UP\", "
                    "\"followUpNumber\": 2}");
        s_step(at, t, c, ++k, "\"downTransferUpdate\": {\"status\": \"DOWN_TRANSFER_COMPLETED\"}");
        break;
    }
}

/* Checks a published study against its manifest, as the reading centre's
 * system would before a radiologist opens it. Returns 1 when every object
 * is there with the digest the manifest gives. */
static int s_study_ok(const char *dir)
{
    char path[S_PATH * 3];
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    json_error_t jerr;
    json_t *m = json_load_file(path, 0, &jerr);
    if (!m)
        return 0;
    json_t *objs = json_object_get(m, "objects");
    int ok = json_array_size(objs) > 0;
    for (size_t i = 0; ok && i < json_array_size(objs); i++) {
        json_t *o = json_array_get(objs, i);
        const char *fn = json_string_value(json_object_get(o, "fileName"));
        const char *want = json_string_value(json_object_get(o, "sha256"));
        char got[ML_SHA256_HEX + 1];
        uint64_t size = 0;
        snprintf(path, sizeof path, "%s/%s", dir, fn ? fn : "?");
        if (!fn || !want || ml_sha256_file(path, got, &size) != 0 || strcmp(got, want) != 0)
            ok = 0;
    }
    json_decref(m);
    return ok;
}

enum { S_READ = 0, S_DEFER = 1 };

/* What the hospital's system does with one inbox message. */
static int s_at_hospital(int node, json_t *j, const char *from, const char *case_id)
{
    json_t *p;
    s_case_t *c;
    if ((p = json_object_get(j, "referral"))) {
        c = s_case_by_token(s_token_of(p));
        if (!c || c->kind != K_REF) {
            G.unknown++;
            return S_READ;
        }
        s_bind_case(c, case_id);
        snprintf(c->last, sizeof c->last, "referral at hospital");
        s_hospital_answers(c);
        return S_READ;
    }
    if ((p = json_object_get(j, "referralUpdate"))) {
        const char *st = json_string_value(json_object_get(p, "status"));
        if (!(c = s_case_by_id(case_id)))
            return S_DEFER;
        if (st && strcmp(st, "REFERRAL_CLOSED") == 0 && (c->plan == 'A' || c->plan == 'D'))
            s_done(c, "hospital got CLOSED");
        return S_READ;
    }
    if ((p = json_object_get(j, "downTransferUpdate"))) {
        const char *st = json_string_value(json_object_get(p, "status"));
        if (!(c = s_case_by_id(case_id)))
            return S_DEFER;
        if (st)
            snprintf(c->last, sizeof c->last, "hospital got %s", st);
        if (st && strcmp(st, "DOWN_TRANSFER_COMPLETED") == 0 && c->plan == 'F')
            s_done(c, "hospital got COMPLETED");
        else if (st && strcmp(st, "DOWN_TRANSFER_DECLINED") == 0 && c->plan == 'X')
            s_done(c, "hospital got DECLINED");
        else if (st && strcmp(st, "DOWN_TRANSFER_RE_REFERRED") == 0 && c->plan == 'R')
            s_done(c, "hospital got RE_REFERRED");
        return S_READ;
    }
    if (json_object_get(j, "escalation"))
        G.escalations++;
    return S_READ;
}

static int s_at_clinic(int node, json_t *j, const char *from, const char *case_id)
{
    json_t *p;
    s_case_t *c;
    int by_broker = s_node_by_id(from) < 0;
    if ((p = json_object_get(j, "referralUpdate"))) {
        const char *st = json_string_value(json_object_get(p, "status"));
        if (by_broker) {
            G.notices++;
            return S_READ;
        }
        if (!(c = s_case_by_id(case_id)))
            return S_DEFER;
        if (!st)
            return S_READ;
        snprintf(c->last, sizeof c->last, "clinic got %s", st);
        if ((strcmp(st, "REFERRAL_DISCHARGED") == 0 && c->plan == 'A') ||
            (strcmp(st, "REFERRAL_ARRIVED") == 0 && c->plan == 'D'))
            s_step(ml_mono_ms(), node, c, 20,
                   "\"referralUpdate\": {\"status\": \"REFERRAL_CLOSED\", \"notes\": \"filed\"}");
        else if (strcmp(st, "REFERRAL_REJECTED") == 0 && c->plan == 'C')
            s_done(c, "clinic got REJECTED");
        else if (strcmp(st, "REFERRAL_CLOSED") == 0 && c->plan == 'B')
            s_done(c, "clinic got CLOSED");
        return S_READ;
    }
    if ((p = json_object_get(j, "downTransfer"))) {
        c = s_case_by_token(s_token_of(p));
        if (!c || c->kind != K_DOWN) {
            G.unknown++;
            return S_READ;
        }
        s_bind_case(c, case_id);
        snprintf(c->last, sizeof c->last, "down-transfer at clinic");
        s_clinic_down_answers(c);
        return S_READ;
    }
    if ((p = json_object_get(j, "imagingUpdate"))) {
        const char *st = json_string_value(json_object_get(p, "status"));
        if (by_broker) {
            G.notices++;
            return S_READ;
        }
        if (!(c = s_case_by_id(case_id)))
            return S_DEFER;
        if (st)
            snprintf(c->last, sizeof c->last, "clinic got %s", st);
        if (st && strcmp(st, "IMAGING_REJECTED") == 0 && c->plan == 'J')
            s_done(c, "clinic got REJECTED");
        return S_READ;
    }
    if ((p = json_object_get(j, "imagingReport"))) {
        if (!(c = s_case_by_id(case_id)))
            return S_DEFER;
        snprintf(c->last, sizeof c->last, "clinic got the report");
        s_step(ml_mono_ms(), node, c, 20,
               "\"imagingUpdate\": {\"status\": \"IMAGING_CLOSED\", \"notes\": \"report filed\"}");
        return S_READ;
    }
    if (json_object_get(j, "escalation"))
        G.escalations++;
    return S_READ;
}

static int s_at_reader(int node, json_t *j, const char *from, const char *case_id)
{
    json_t *p;
    s_case_t *c;
    if ((p = json_object_get(j, "imagingConsult"))) {
        c = s_case_by_token(s_token_of(p));
        if (!c || c->kind != K_IMG) {
            G.unknown++;
            return S_READ;
        }
        s_bind_case(c, case_id);
        c->to = node;
        snprintf(c->last, sizeof c->last, "consult at %.40s", G.nodes[node].id);
        return S_READ;
    }
    if ((p = json_object_get(j, "imagingUpdate"))) {
        const char *st = json_string_value(json_object_get(p, "status"));
        if (!(c = s_case_by_id(case_id)))
            return S_DEFER;
        if (st && strcmp(st, "IMAGING_CLOSED") == 0 && c->plan == 'I')
            s_done(c, "reading centre got CLOSED");
        return S_READ;
    }
    if (json_object_get(j, "escalation"))
        G.escalations++;
    return S_READ;
}

/* A study folder appeared in a reading centre's inbox. */
static int s_study(int node, const char *dir, const char *case_id)
{
    s_case_t *c = s_case_by_id(case_id);
    if (!c)
        return S_DEFER;
    if (!s_study_ok(dir)) {
        G.study_bad++;
        s_logf("case %06d: study %s does not match its manifest", c->token, dir);
    } else {
        G.studies_ok++;
    }
    snprintf(c->last, sizeof c->last, "study published at %.32s", G.nodes[node].id);
    if (c->plan == 'J') {
        s_step(ml_mono_ms(), node, c, 1,
               "\"imagingUpdate\": {\"status\": \"IMAGING_REJECTED\", \"reason\": \"motion "
               "artefacts\"}");
        return S_READ;
    }
    char *payload =
        s_fmt("\"imagingReport\": {\"studyInstanceUid\": \"%s\", \"findings\": "
              "\"soak findings\", \"impression\": \"soak impression\", \"reader\": "
              "{\"name\": \"Dr. Soak\"}, \"signedAt\": \"%" PRId64 "\", \"criticalFinding\": %s}",
              c->study_uid, ml_now_ms(), s_between(0, 99) < 15 ? "true" : "false");
    s_step(ml_mono_ms(), node, c, 1, payload);
    free(payload);
    return S_READ;
}

/* Reads one inbox entry; returns S_READ or S_DEFER (its case is not known
 * yet: the message that names the case has not been read). */
static int s_read_entry(int node, const char *name, int is_dir)
{
    s_node_t *n = &G.nodes[node];
    char path[S_PATH * 2];
    snprintf(path, sizeof path, "%s/inbox/%s", n->spool, name);
    if (is_dir)
        return n->role == R_READER ? s_study(node, path, name + 6) : S_READ;
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    if (!j) {
        s_logf("%s: cannot read %s: %s", n->id, path, jerr.text);
        G.unknown++;
        return S_READ;
    }
    const char *from = json_string_value(json_object_get(j, "from"));
    const char *case_id = json_string_value(json_object_get(j, "caseId"));
    int rc = S_READ;
    if (n->role == R_HOSPITAL)
        rc = s_at_hospital(node, j, from, case_id);
    else if (n->role == R_CLINIC)
        rc = s_at_clinic(node, j, from, case_id);
    else
        rc = s_at_reader(node, j, from, case_id);
    (void)s_prio_parse;
    json_decref(j);
    return rc;
}

/* One pass over a node's inbox: new JSON files first (a consult before
 * the study it opened), then study folders. */
static void s_scan(int node)
{
    s_node_t *n = &G.nodes[node];
    char dir[S_PATH + 16];
    if (snprintf(dir, sizeof dir, "%s/inbox", n->spool) >= (int)sizeof dir)
        s_die("spool path too long: %s", n->spool);
    for (int pass = 0; pass < 2; pass++) {
        DIR *d = opendir(dir);
        if (!d)
            return;
        struct dirent *e;
        while ((e = readdir(d))) {
            const char *nm = e->d_name;
            size_t l = strlen(nm);
            int is_json = l > 5 && strcmp(nm + l - 5, ".json") == 0 && nm[0] != '.';
            int is_study = strncmp(nm, "study-", 6) == 0;
            if ((pass == 0 && !is_json) || (pass == 1 && !is_study))
                continue;
            int64_t *ino = s_map_get(&n->seen, nm);
            if (ino) {
                if (*ino != (int64_t)e->d_ino) {
                    /* The same message written to inbox/ a second time. */
                    G.respooled++;
                    s_logf("%s: inbox/%s appeared again (inode %" PRId64 " -> %" PRIu64 ")", n->id,
                           nm, *ino, (uint64_t)e->d_ino);
                    *ino = (int64_t)e->d_ino;
                }
                continue;
            }
            int rc = s_read_entry(node, nm, is_study);
            if (rc == S_DEFER) {
                int64_t *first = s_map_get(&n->deferred, nm);
                if (!first) {
                    s_map_put(&n->deferred, nm, ml_mono_ms());
                    continue;
                }
                if (ml_mono_ms() - *first < S_DEFER_GIVE_UP_MS)
                    continue;
                G.gave_up++;
                s_logf("%s: gave up on inbox/%s: its case never became known", n->id, nm);
            }
            s_map_put(&n->seen, nm, (int64_t)e->d_ino);
            n->files++;
        }
        closedir(d);
    }
}

/* ---- main --------------------------------------------------------------- */

static void s_split(const char *list, int role)
{
    char *copy = strdup(list), *save = NULL;
    for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        int i = s_add_node(t, role);
        if (role == R_CLINIC)
            G.clinics[G.n_clinics++] = i;
    }
    free(copy);
}

static void s_write_cases(void)
{
    char path[S_PATH + 32];
    snprintf(path, sizeof path, "%s/cases.tsv", G.out);
    FILE *f = fopen(path, "w");
    if (!f)
        s_die("cannot write %s", path);
    for (int i = 0; i < G.n_cases; i++) {
        const s_case_t *c = &G.cases[i];
        fprintf(f, "%06d\t%c\t%c\t%s\t%s\t%d\t%s\n", c->token, c->kind, c->plan,
                c->case_id[0] ? c->case_id : "-", s_expected_state(c), c->done, c->last);
    }
    fclose(f);
}

static void s_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int main(int argc, char **argv)
{
    const char *hospital = NULL, *clinics = NULL, *readers = NULL;
    G.rate = 2.0;
    G.duration_s = 60;
    G.drain_s = 180;
    G.idle_s = 60;
    G.mix[0] = 50;
    G.mix[1] = 30;
    G.mix[2] = 20;
    G.big_pct = 5;
    G.seed = (unsigned)time(NULL);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            s_die("option %s needs a value", a);
        i++;
        if (!strcmp(a, "--world"))
            snprintf(G.world, sizeof G.world, "%s", v);
        else if (!strcmp(a, "--out"))
            snprintf(G.out, sizeof G.out, "%s", v);
        else if (!strcmp(a, "--hospital"))
            hospital = v;
        else if (!strcmp(a, "--clinics"))
            clinics = v;
        else if (!strcmp(a, "--readers"))
            readers = v;
        else if (!strcmp(a, "--rate"))
            G.rate = atof(v);
        else if (!strcmp(a, "--duration"))
            G.duration_s = atoi(v);
        else if (!strcmp(a, "--drain"))
            G.drain_s = atoi(v);
        else if (!strcmp(a, "--idle"))
            G.idle_s = atoi(v);
        else if (!strcmp(a, "--seed"))
            G.seed = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--big"))
            G.big_pct = atoi(v);
        else if (!strcmp(a, "--mix")) {
            if (sscanf(v, "%d,%d,%d", &G.mix[0], &G.mix[1], &G.mix[2]) != 3 ||
                G.mix[0] + G.mix[1] + G.mix[2] <= 0)
                s_die("--mix wants R,I,T weights");
        } else
            s_die("unknown option %s", a);
    }
    if (!G.world[0] || !G.out[0] || !hospital || !clinics || !readers || G.rate <= 0)
        s_die("usage: fault-driver --world DIR --out DIR --hospital ID --clinics ID,.. "
              "--readers ID,.. [--rate R] [--duration S] [--drain S] [--idle S] [--seed N] [--mix "
              "R,I,T] "
              "[--big PCT]");
    G.hospital = s_add_node(hospital, R_HOSPITAL);
    s_split(clinics, R_CLINIC);
    s_split(readers, R_READER);
    char path[S_PATH + 32];
    snprintf(path, sizeof path, "%s/driver.log", G.out);
    G.log = fopen(path, "a");
    if (G.log)
        setvbuf(G.log, NULL, _IOLBF, 0);
    signal(SIGUSR1, s_on_usr1);
    signal(SIGUSR2, s_on_usr2);
    signal(SIGTERM, s_on_term);
    signal(SIGINT, s_on_term);
    s_logf("driver starts: seed %u, %.2f cases/s for %d s, drain %d s", G.seed, G.rate,
           G.duration_s, G.drain_s);

    int64_t start = ml_mono_ms(), next_case = start, last_scan = 0, drain_from = 0;
    int64_t load_end = start + (int64_t)G.duration_s * 1000;
    int64_t last_progress_at = start;
    int paused = 0;
    long last_progress = -1;
    int rc = 0;
    for (;;) {
        int64_t now = ml_mono_ms();
        if (s_stop_now) {
            rc = 4;
            break;
        }
        if (s_toggle_pause) {
            s_toggle_pause = 0;
            paused = !paused;
            next_case = now; /* no burst of the cases a pause skipped */
            s_logf(paused ? "new cases paused" : "new cases resumed");
        }
        int loading = !s_stop_load && now < load_end;
        if (loading && !paused) {
            while (next_case <= now) {
                s_open_random();
                /* Exponential gaps: a Poisson stream of new cases. */
                double u = (s_rand() % 10000 + 1) / 10001.0;
                next_case += (int64_t)(-1000.0 / G.rate * __builtin_log(u)) + 1;
            }
        } else if (!drain_from) {
            drain_from = now;
            s_logf("load phase over: %d cases; draining", G.n_cases);
        }
        while (G.n_heap > 0 && G.heap[0].due <= now) {
            s_action_t a = s_heap_pop();
            s_drop(a.node, a.name, a.json);
            free(a.json);
        }
        if (now - last_scan >= S_SCAN_MS) {
            last_scan = now;
            for (int i = 0; i < G.n_nodes; i++)
                s_scan(i);
        }
        if (drain_from) {
            int open = 0;
            long progress = G.dropped_files;
            for (int i = 0; i < G.n_cases; i++)
                open += !G.cases[i].done;
            for (int i = 0; i < G.n_nodes; i++)
                progress += G.nodes[i].files;
            if (open == 0 && G.n_heap == 0)
                break;
            /* Nothing read, nothing written for idle_s: what is left is
             * stuck (a refused step), waiting longer shows nothing new. */
            if (progress != last_progress) {
                last_progress = progress;
                last_progress_at = now;
            }
            if (now - drain_from > (int64_t)G.drain_s * 1000 ||
                now - last_progress_at > (int64_t)G.idle_s * 1000) {
                rc = 3;
                break;
            }
        }
        s_sleep_ms(20);
    }
    s_write_cases();
    long done = 0, by_kind[3] = {0};
    for (int i = 0; i < G.n_cases; i++) {
        done += G.cases[i].done;
        by_kind[G.cases[i].kind == K_REF ? 0 : G.cases[i].kind == K_IMG ? 1 : 2]++;
    }
    long inbox = 0;
    for (int i = 0; i < G.n_nodes; i++)
        inbox += G.nodes[i].files;
    printf("driver cases %d referrals %ld imaging %ld down_transfers %ld done %ld incomplete %ld "
           "files_dropped %ld inbox_read %ld studies_ok %ld studies_bad %ld respooled %ld "
           "notices %ld escalations %ld unknown %ld gave_up %ld\n",
           G.n_cases, by_kind[0], by_kind[1], by_kind[2], done, (long)G.n_cases - done,
           G.dropped_files, inbox, G.studies_ok, G.study_bad, G.respooled, G.notices, G.escalations,
           G.unknown, G.gave_up);
    int shown = 0;
    for (int i = 0; i < G.n_cases && shown < 20; i++) {
        const s_case_t *c = &G.cases[i];
        if (!c->done) {
            printf("  incomplete: %06d %c%c case %s: last %s\n", c->token, c->kind, c->plan,
                   c->case_id[0] ? c->case_id : "-", c->last);
            shown++;
        }
    }
    s_logf("driver ends (%d)", rc);
    if (G.log)
        fclose(G.log);
    return rc;
}
