/* The spool folders against a local attacker (threat class 1 in
 * docs/security.md): whoever can write a clinic's spool may plant symbolic
 * links, FIFOs and folders under any name and swap files between the
 * agent's checks. Real medlinkd and agents, as everywhere in tests/integration:
 *
 *   - F1: links planted at every temporary name the agent used to write
 *     through (NAME.tmp.<pid> in sent/, rejected/ and inbox/) leave agent.db
 *     and the link targets untouched, and the agent keeps working;
 *   - F2: a study file swapped for a link to the agent's TLS key right after
 *     the agent looked at it never sends the key; a link or FIFO already in
 *     NAME.d refuses the consult with a reason naming the file;
 *   - F12: a FIFO, a folder and a link named *.json in outbox/ are reported
 *     (warning, rejected/NAME.error) and never opened or waited on;
 *   - a UTF-8 file with a byte order mark is taken, a GBK one refused with a
 *     reason saying the file must be UTF-8. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <dirent.h>
#include <poll.h>

#include "harness.h"
#include "study.h"
#include "ml_common.h"
#include "ml_imaging.h"

#define STUDY_UID "1.2.826.0.1.3680043.8.498.9101"

static h_world_t W;

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(security, .fini = s_teardown, .timeout = 600);

/* ---- helpers ------------------------------------------------------------ */

static void s_path(char *out, size_t len, const char *node, const char *sub, const char *name)
{
    char dir[700];
    h_spool(&W, node, sub, dir, sizeof dir);
    int n = snprintf(out, len, "%s/%s", dir, name);
    cr_assert(n > 0 && (size_t)n < len, "path too long");
}

static char *s_read(const char *path, size_t *len)
{
    char *buf = NULL;
    size_t n = 0;
    if (ml_read_file(path, 64u << 20, &buf, &n) != 0)
        return NULL;
    if (len)
        *len = n;
    return buf;
}

static pid_t s_agent_pid(const char *node)
{
    for (int i = 0; i < W.n_agents; i++)
        if (strcmp(W.agent_ids[i], node) == 0)
            return W.agents[i];
    cr_assert_fail("no agent %s", node);
    return -1;
}

static void s_key_path(const char *node, char *out, size_t len)
{
    snprintf(out, len, "%s/pki/%s.key", W.dir, node);
}

/* Waits until path exists (lstat); returns 1 if it did within timeout_ms. */
static int s_wait_path(const char *path, int timeout_ms)
{
    struct stat st;
    for (int waited = 0; waited < timeout_ms; waited += 50) {
        if (lstat(path, &st) == 0)
            return 1;
        h_sleep_ms(50);
    }
    return lstat(path, &st) == 0;
}

static void s_assert_sqlite(const char *node)
{
    char db[700];
    snprintf(db, sizeof db, "%s/data/%s/agent.db", W.dir, node);
    int fd = open(db, O_RDONLY);
    cr_assert(fd >= 0, "no %s", db);
    char head[16] = {0};
    cr_assert_eq(read(fd, head, 16), 16);
    close(fd);
    cr_assert(memcmp(head, "SQLite format 3", 16) == 0, "%s is no longer an SQLite database", db);
}

/* Whether the bytes needle[0..n) occur in any file under dir (recursive). */
static int s_tree_contains(const char *dir, const char *needle, size_t n)
{
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    int found = 0;
    struct dirent *de;
    while (!found && (de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        char p[1200];
        struct stat st;
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        if (lstat(p, &st) != 0)
            continue;
        if (S_ISDIR(st.st_mode)) {
            found = s_tree_contains(p, needle, n);
        } else if (S_ISREG(st.st_mode)) {
            size_t len = 0;
            char *text = s_read(p, &len);
            found = text && memmem(text, len, needle, n) != NULL;
            free(text);
        }
    }
    closedir(d);
    return found;
}

/* A referral with a message id chosen here (the hospital system may set
 * it), so that the inbox file name at the receiver is known in advance. */
static char *s_referral_with_id(const char *to, const char *id)
{
    char *base = h_referral_json(to, "Wang Fang", NULL);
    size_t cap = strlen(base) + 64;
    char *out = malloc(cap);
    cr_assert_not_null(out);
    cr_assert(base[0] == '{');
    snprintf(out, cap, "{\n  \"id\": \"%s\",%s", id, base + 1);
    free(base);
    return out;
}

/* The study's image number index, with about `pixels` bytes of
 * pseudo-random pixel data (tests/common/study.h); its SHA-256 into sha (may be NULL). */
static void s_write_dicom(const char *path, int index, size_t pixels, char sha[65])
{
    static const tc_dicom_t study = {.study_uid = STUDY_UID,
                                     .series_uid = "1.2.826.0.1.3680043.8.498.9102",
                                     .sop_prefix = "1.2.826.0.1.3680043.8.498.91",
                                     .patient = NULL};
    cr_assert_eq(tc_dicom_write(&study, path, index, pixels, sha), 0, "cannot write %s: %s", path,
                 strerror(errno));
}

static void s_consult_json(char *out, size_t len)
{
    snprintf(out, len,
             "{\"to\": \"%s\", \"imagingConsult\": {"
             "\"patient\": {\"healthCardId\": \"130102196001017777\", \"name\": \"Zhang Wei\"},"
             "\"requestingDoctor\": {\"name\": \"Dr. Liu Fang\"}, \"bodyPart\": \"CHEST\","
             "\"clinicalQuestion\": \"Mass in the left lower lobe?\"}}",
             H_SERVICE_CT);
}

/* ---- F1 ------------------------------------------------------------------ */

/* Before the fix the agent wrote every spool file through
 * PATH.tmp.<its pid>, opened with O_CREAT|O_TRUNC: a link planted there was
 * followed, and agent.db became JSON. Links are planted at every such name
 * the next messages use (sent/ and rejected/ at the clinic, inbox/ at the
 * county); none may be written through. */
Test(security, f1_temp_file_symlink_not_followed)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_XINZHAN);
    h_agent_start(&W, H_COUNTY);
    pid_t clinic = s_agent_pid(H_XINZHAN), county = s_agent_pid(H_COUNTY);

    char db[700], victim[700], link[900];
    snprintf(db, sizeof db, "%s/data/%s/agent.db", W.dir, H_XINZHAN);
    snprintf(victim, sizeof victim, "%s/victim.txt", W.dir);
    FILE *f = fopen(victim, "w");
    cr_assert(f);
    fputs("nobody may write this file\n", f);
    fclose(f);

    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    char name[300];
    /* The clinic's sent/ref.json, its rejected/bad.json.error, and the
     * county's inbox/<id>.json: each temp name points at something. */
    snprintf(name, sizeof name, "ref.json.tmp.%ld", (long)clinic);
    s_path(link, sizeof link, H_XINZHAN, "sent", name);
    cr_assert_eq(symlink(db, link), 0, "symlink %s: %s", link, strerror(errno));
    snprintf(name, sizeof name, "bad.json.error.tmp.%ld", (long)clinic);
    s_path(link, sizeof link, H_XINZHAN, "rejected", name);
    cr_assert_eq(symlink(victim, link), 0);
    snprintf(name, sizeof name, "%s.json.tmp.%ld", id, (long)county);
    s_path(link, sizeof link, H_COUNTY, "inbox", name);
    cr_assert_eq(symlink(victim, link), 0);
    /* And the final names too: a rename over a link replaces the link. */
    s_path(link, sizeof link, H_XINZHAN, "sent", "ref2.json");
    cr_assert_eq(symlink(victim, link), 0);

    char *ref = s_referral_with_id(H_COUNTY, id);
    h_drop(&W, H_XINZHAN, "ref.json", ref);
    free(ref);
    h_drop(&W, H_XINZHAN, "bad.json", "{ this is not JSON");

    char p[900];
    s_path(p, sizeof p, H_XINZHAN, "rejected", "bad.json.error");
    cr_assert(s_wait_path(p, 30000), "bad.json was never rejected");
    char *sent = h_wait_json(&W, H_XINZHAN, "sent", id, 30000);
    cr_assert_not_null(sent, "the referral was never accepted");
    free(sent);
    snprintf(name, sizeof name, "%s.json", id);
    s_path(p, sizeof p, H_COUNTY, "inbox", name);
    cr_assert(s_wait_path(p, 30000), "the county never spooled %s", name);

    /* Nothing was written through a link. */
    s_assert_sqlite(H_XINZHAN);
    char *v = s_read(victim, NULL);
    cr_assert(v && strcmp(v, "nobody may write this file\n") == 0, "victim.txt was written: %s",
              v ? v : "(gone)");
    free(v);
    /* The files themselves are real files with the content. */
    struct stat st;
    cr_assert_eq(lstat(p, &st), 0);
    cr_assert(S_ISREG(st.st_mode), "inbox/%s is not a regular file", name);
    s_path(p, sizeof p, H_XINZHAN, "sent", "ref.json");
    cr_assert_eq(lstat(p, &st), 0);
    cr_assert(S_ISREG(st.st_mode));
    char *text = s_read(p, NULL);
    cr_assert(text && strstr(text, id), "sent/ref.json does not hold the message");
    free(text);

    /* The agent keeps working: a second referral goes through (its sent/
     * name is the planted link, replaced, not followed). */
    ref = h_referral_json(H_COUNTY, "Li Na", NULL);
    h_drop(&W, H_XINZHAN, "ref2.json", ref);
    free(ref);
    sent = h_wait_json(&W, H_XINZHAN, "sent", "Li Na", 30000);
    cr_assert_not_null(sent, "the second referral was never accepted");
    free(sent);
    cr_assert_eq(kill(clinic, 0), 0, "the clinic's agent died");
    s_assert_sqlite(H_XINZHAN);
    v = s_read(victim, NULL);
    cr_assert(v && strcmp(v, "nobody may write this file\n") == 0, "victim.txt was written");
    free(v);
    /* And it starts again on its agent.db. */
    int ups = h_log_contains(&W, "agent-" H_XINZHAN ".log", "session up");
    h_agent_stop(&W, H_XINZHAN);
    h_agent_start(&W, H_XINZHAN);
    /* Up means past opening agent.db and the spool: wait for its session
     * rather than for a while. */
    for (int waited = 0;
         waited < 20000 && h_log_contains(&W, "agent-" H_XINZHAN ".log", "session up") <= ups;
         waited += 50)
        h_sleep_ms(50);
    cr_assert_gt(h_log_contains(&W, "agent-" H_XINZHAN ".log", "session up"), ups,
                 "the clinic's agent did not come up again");
    cr_assert_eq(kill(s_agent_pid(H_XINZHAN), 0), 0, "the clinic's agent does not start again");
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

/* ---- F2 ------------------------------------------------------------------ */

/* Before the fix, the agent probed every study file by path, then copied
 * each by path again. The test waits (inotify) until the agent has opened
 * and closed IM0002.dcm for the first time, then swaps it for a link to
 * the agent's TLS key while the agent copies the large IM0001.dcm. The
 * key must never reach the reading centre: the agent read IM0002.dcm once,
 * through one fd, so the swap comes too late (or, had it come before the
 * open, the file would be refused). */
Test(security, f2_study_file_swapped_for_symlink)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_XINZHAN);
    h_agent_start(&W, H_READ_A);

    char outbox[700], dir[900], p1[1000], p2[1000], key[700];
    char shas[2][65];
    h_spool(&W, H_XINZHAN, "outbox", outbox, sizeof outbox);
    snprintf(dir, sizeof dir, "%s/swap.d", outbox);
    cr_assert_eq(ml_mkdirs(dir), 0);
    snprintf(p1, sizeof p1, "%s/IM0001.dcm", dir);
    snprintf(p2, sizeof p2, "%s/IM0002.dcm", dir);
    s_write_dicom(p1, 1, 32u << 20, shas[0]);
    s_write_dicom(p2, 2, 4096, shas[1]);
    s_key_path(H_XINZHAN, key, sizeof key);
    size_t klen = 0;
    char *keybytes = s_read(key, &klen);
    cr_assert(keybytes && klen > 64, "cannot read %s", key);

    /* The watch is on the folder's inode: it follows the folder into
     * pending/. */
    int in = inotify_init1(IN_CLOEXEC);
    cr_assert(in >= 0);
    cr_assert(inotify_add_watch(in, dir, IN_CLOSE_NOWRITE) >= 0);
    char json[1024];
    s_consult_json(json, sizeof json);
    h_drop(&W, H_XINZHAN, "swap.json", json);

    int swapped = 0;
    for (int waited = 0; !swapped && waited < 60000; waited += 100) {
        struct pollfd pf = {in, POLLIN, 0};
        if (poll(&pf, 1, 100) <= 0)
            continue;
        char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
        ssize_t n = read(in, buf, sizeof buf);
        for (char *at = buf; n > 0 && at < buf + n;) {
            const struct inotify_event *ev = (const struct inotify_event *)at;
            if (!swapped && ev->len && strcmp(ev->name, "IM0002.dcm") == 0) {
                char pd[900], tmp[1100], dst[1100];
                s_path(pd, sizeof pd, H_XINZHAN, "pending", "swap.d");
                snprintf(tmp, sizeof tmp, "%s/.swap", pd);
                snprintf(dst, sizeof dst, "%s/IM0002.dcm", pd);
                cr_assert_eq(symlink(key, tmp), 0, "symlink: %s", strerror(errno));
                cr_assert_eq(rename(tmp, dst), 0, "swap: %s", strerror(errno));
                swapped = 1;
            }
            at += sizeof *ev + ev->len;
        }
    }
    close(in);
    cr_assert(swapped, "the agent never opened IM0002.dcm");

    /* Either the study arrives with the original bytes, or the consult is
     * refused with a reason naming the file; never the key. */
    char inbox[700], manifest[1200], err[900];
    h_spool(&W, H_READ_A, "inbox", inbox, sizeof inbox);
    s_path(err, sizeof err, H_XINZHAN, "rejected", "swap.json.error");
    int published = 0, refused = 0;
    for (int waited = 0; waited < 120000 && !published && !refused; waited += 100) {
        DIR *d = opendir(inbox);
        struct dirent *de;
        while (d && (de = readdir(d)) != NULL) {
            if (strncmp(de->d_name, "study-", 6) != 0)
                continue;
            snprintf(manifest, sizeof manifest, "%s/%s/manifest.json", inbox, de->d_name);
            struct stat st;
            published = stat(manifest, &st) == 0;
        }
        if (d)
            closedir(d);
        struct stat st;
        refused = stat(err, &st) == 0;
        if (!published && !refused)
            h_sleep_ms(100);
    }
    cr_assert(published || refused, "the consult was neither published nor refused");
    cr_assert(!s_tree_contains(inbox, keybytes, klen),
              "the clinic's TLS private key reached the reading centre's inbox");
    char blobs[700];
    snprintf(blobs, sizeof blobs, "%s/data/%s/blobs", W.dir, H_XINZHAN);
    cr_assert(!s_tree_contains(blobs, keybytes, klen), "the key was copied into the blob store");
    if (published) {
        char *m = s_read(manifest, NULL);
        cr_assert(m && strstr(m, shas[1]), "IM0002.dcm arrived with other bytes: %s", m);
        free(m);
    } else {
        char *why = s_read(err, NULL);
        cr_assert(why && strstr(why, "IM0002.dcm"), "the reason does not name the file: %s", why);
        free(why);
    }
    free(keybytes);
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_READ_A);
    h_broker_stop(&W);
}

/* A link (to the agent's key), a FIFO or a hard-linked file in NAME.d: the consult is
 * refused with a reason naming the file and what it is; the FIFO does not
 * block the agent (the next message is still taken). */
Test(security, f2_study_link_and_fifo_refused)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_XINZHAN);

    char outbox[700], dir[900], p[1000], key[700], json[1024];
    h_spool(&W, H_XINZHAN, "outbox", outbox, sizeof outbox);
    s_key_path(H_XINZHAN, key, sizeof key);
    s_consult_json(json, sizeof json);

    snprintf(dir, sizeof dir, "%s/linked.d", outbox);
    cr_assert_eq(ml_mkdirs(dir), 0);
    snprintf(p, sizeof p, "%s/IM0001.dcm", dir);
    s_write_dicom(p, 1, 4096, NULL);
    snprintf(p, sizeof p, "%s/IM0002.dcm", dir);
    cr_assert_eq(symlink(key, p), 0);
    h_drop(&W, H_XINZHAN, "linked.json", json);

    snprintf(dir, sizeof dir, "%s/piped.d", outbox);
    cr_assert_eq(ml_mkdirs(dir), 0);
    snprintf(p, sizeof p, "%s/IM0001.dcm", dir);
    cr_assert_eq(mkfifo(p, 0640), 0);
    snprintf(p, sizeof p, "%s/IM0002.dcm", dir);
    s_write_dicom(p, 2, 4096, NULL);
    h_drop(&W, H_XINZHAN, "piped.json", json);

    /* A hard link (here to a DICOM file outside the spool; it could be
     * one to a file its writer may not read). */
    char outside[900];
    snprintf(outside, sizeof outside, "%s/outside.dcm", W.dir);
    s_write_dicom(outside, 3, 4096, NULL);
    snprintf(dir, sizeof dir, "%s/hard.d", outbox);
    cr_assert_eq(ml_mkdirs(dir), 0);
    snprintf(p, sizeof p, "%s/IM0001.dcm", dir);
    cr_assert_eq(link(outside, p), 0, "link: %s", strerror(errno));
    h_drop(&W, H_XINZHAN, "hard.json", json);

    char err[900];
    s_path(err, sizeof err, H_XINZHAN, "rejected", "linked.json.error");
    cr_assert(s_wait_path(err, 30000), "linked.json was never refused");
    char *why = s_read(err, NULL);
    cr_assert(why && strstr(why, "IM0002.dcm") && strstr(why, "symbolic link"), "reason: %s", why);
    free(why);
    s_path(err, sizeof err, H_XINZHAN, "rejected", "piped.json.error");
    cr_assert(s_wait_path(err, 30000), "piped.json was never refused");
    why = s_read(err, NULL);
    cr_assert(why && strstr(why, "IM0001.dcm") && strstr(why, "FIFO"), "reason: %s", why);
    free(why);
    s_path(err, sizeof err, H_XINZHAN, "rejected", "hard.json.error");
    cr_assert(s_wait_path(err, 30000), "hard.json was never refused");
    why = s_read(err, NULL);
    cr_assert(why && strstr(why, "IM0001.dcm") && strstr(why, "hard link"), "reason: %s", why);
    free(why);

    /* Not blocked: a referral after them is still sent. */
    char *ref = h_referral_json(H_COUNTY, "Zhao Lei", NULL);
    h_agent_start(&W, H_COUNTY);
    h_drop(&W, H_XINZHAN, "after.json", ref);
    free(ref);
    char *sent = h_wait_json(&W, H_XINZHAN, "sent", "Zhao Lei", 30000);
    cr_assert_not_null(sent, "the agent stopped taking files");
    free(sent);
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

/* ---- F12 ----------------------------------------------------------------- */

Test(security, f12_outbox_fifo_dir_symlink_reported)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_XINZHAN);
    h_agent_start(&W, H_COUNTY);

    char p[900], key[700];
    s_key_path(H_XINZHAN, key, sizeof key);
    size_t klen = 0;
    char *keybytes = s_read(key, &klen);
    cr_assert_not_null(keybytes);
    s_path(p, sizeof p, H_XINZHAN, "outbox", "fifo.json");
    cr_assert_eq(mkfifo(p, 0640), 0);
    s_path(p, sizeof p, H_XINZHAN, "outbox", "folder.json");
    cr_assert_eq(mkdir(p, 0750), 0);
    s_path(p, sizeof p, H_XINZHAN, "outbox", "link.json");
    cr_assert_eq(symlink(key, p), 0);

    static const struct {
        const char *name, *what;
    } cases[] = {
        {"fifo.json", "FIFO"}, {"folder.json", "directory"}, {"link.json", "symbolic link"}};
    for (size_t i = 0; i < 3; i++) {
        char e[300];
        snprintf(e, sizeof e, "%s.error", cases[i].name);
        s_path(p, sizeof p, H_XINZHAN, "rejected", e);
        cr_assert(s_wait_path(p, 30000), "no rejected/%s", e);
        char *why = s_read(p, NULL);
        cr_assert(why && strstr(why, cases[i].what), "rejected/%s: %s", e, why);
        free(why);
        /* Moved as it is: outbox/ no longer holds it. The .error is
         * written first (a file in rejected/ always has its reason), so the
         * move may still be under way. */
        s_path(p, sizeof p, H_XINZHAN, "outbox", cases[i].name);
        struct stat st;
        int gone = 0;
        for (int waited = 0; !(gone = lstat(p, &st) != 0) && waited < 10000; waited += 50)
            h_sleep_ms(50);
        cr_assert(gone, "outbox/%s is still there", cases[i].name);
        char line[300];
        snprintf(line, sizeof line, "outbox/%s is a", cases[i].name);
        char log[128];
        snprintf(log, sizeof log, "agent-%s.log", H_XINZHAN);
        int logged = 0;
        for (int waited = 0; !(logged = h_log_contains(&W, log, line) >= 1) && waited < 10000;
             waited += 50)
            h_sleep_ms(50);
        cr_assert(logged, "no log line \"%s\"", line);
    }
    struct stat st;
    s_path(p, sizeof p, H_XINZHAN, "rejected", "link.json");
    cr_assert(lstat(p, &st) == 0 && S_ISLNK(st.st_mode), "rejected/link.json is not the link");
    s_path(p, sizeof p, H_XINZHAN, "rejected", "fifo.json");
    cr_assert(lstat(p, &st) == 0 && S_ISFIFO(st.st_mode), "rejected/fifo.json is not the FIFO");
    /* The key went nowhere, and the agent still takes files. */
    char spool[700];
    snprintf(spool, sizeof spool, "%s/spool", W.dir);
    cr_assert(!s_tree_contains(spool, keybytes, klen), "the key was copied into a spool folder");
    free(keybytes);
    char *ref = h_referral_json(H_COUNTY, "Sun Mei", NULL);
    h_drop(&W, H_XINZHAN, "good.json", ref);
    free(ref);
    char *sent = h_wait_json(&W, H_XINZHAN, "sent", "Sun Mei", 30000);
    cr_assert_not_null(sent, "the agent stopped taking files");
    free(sent);
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

/* ---- encodings ----------------------------------------------------------- */

Test(security, spool_bom_and_gbk_files)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_XINZHAN);
    h_agent_start(&W, H_COUNTY);

    /* UTF-8 with a byte order mark (Windows Notepad's "UTF-8"): taken. */
    char *ref = h_referral_json(H_COUNTY, "Bom Patient", NULL);
    size_t n = strlen(ref);
    char *bom = malloc(n + 4);
    cr_assert_not_null(bom);
    memcpy(bom, "\xEF\xBB\xBF", 3);
    memcpy(bom + 3, ref, n + 1);
    free(ref);
    h_drop(&W, H_XINZHAN, "bom.json", bom);
    free(bom);
    /* GBK: the patient's name 张伟 as GBK bytes D5 C5 CE B0. */
    ref = h_referral_json(H_COUNTY, "\xD5\xC5\xCE\xB0", NULL);
    h_drop(&W, H_XINZHAN, "gbk.json", ref);
    free(ref);

    char *sent = h_wait_json(&W, H_XINZHAN, "sent", "Bom Patient", 30000);
    cr_assert_not_null(sent, "the UTF-8 file with a BOM was not sent");
    free(sent);
    char p[900];
    s_path(p, sizeof p, H_XINZHAN, "rejected", "gbk.json.error");
    cr_assert(s_wait_path(p, 30000), "the GBK file was not refused");
    char *why = s_read(p, NULL);
    cr_assert(why && strstr(why, "not UTF-8") && strstr(why, "GBK"), "reason: %s", why);
    free(why);
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

/* ---- medlinkctl's DICOM folder ------------------------------------------ */

/* The same local user, against the folder medlinkctl sends a study from:
 * a link under --dicom-dir is refused before anything is sent, and a file
 * swapped for a link to a secret after medlinkctl hashed it is refused when
 * it is read again, never sent. */
Test(security, ctl_study_link_and_swap_refused)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_READ_A);
    char bin[600], cfg[700], dir[700], p1[800], p2[800], lnk[800], key[700];
    char shas[2][65];
    h_bin("medlinkctl", bin, sizeof bin);
    h_ctl_config(&W, H_XINZHAN, cfg, sizeof cfg);
    snprintf(dir, sizeof dir, "%s/ctl-study", W.dir);
    cr_assert_eq(ml_mkdirs(dir), 0);
    snprintf(p1, sizeof p1, "%s/IM0001.dcm", dir);
    snprintf(p2, sizeof p2, "%s/IM0002.dcm", dir);
    s_write_dicom(p1, 1, 8u << 20, shas[0]);
    s_write_dicom(p2, 2, 4096, shas[1]);
    s_key_path(H_XINZHAN, key, sizeof key);
    size_t klen = 0;
    char *keybytes = s_read(key, &klen);
    cr_assert(keybytes && klen > 64);

    /* A link in the folder: refused, naming it. */
    snprintf(lnk, sizeof lnk, "%s/IM0003.dcm", dir);
    cr_assert_eq(symlink(key, lnk), 0);
    int st = -1;
    char *out = h_run(&st,
                      "'%s' --config '%s' send imaging --to %s --patient-name 'Zhang San' "
                      "--health-card 130102198001011234 --dicom-dir '%s' 2>&1",
                      bin, cfg, H_SERVICE_CT, dir);
    cr_assert_neq(st, 0, "a link under --dicom-dir was taken:\n%s", out);
    cr_assert(strstr(out, "IM0003.dcm") && strstr(out, "symbolic link"), "%s", out);
    free(out);
    cr_assert_eq(unlink(lnk), 0);

    /* A swap after the hash: IM0002.dcm is closed after it was hashed (the
     * last of the two), then replaced by a hard link to a secret of exactly
     * its size (a size check alone would pass it) while the 8 MiB of
     * IM0001.dcm are still being sent. */
    struct stat st2;
    cr_assert_eq(stat(p2, &st2), 0);
    free(keybytes);
    klen = (size_t)st2.st_size;
    keybytes = malloc(klen);
    for (size_t i = 0; i < klen; i++)
        keybytes[i] = "SECRET-of-the-operator-"[i % 23];
    snprintf(key, sizeof key, "%s/secret.bin", W.dir);
    FILE *sf = fopen(key, "wb");
    cr_assert(sf && fwrite(keybytes, 1, klen, sf) == klen);
    fclose(sf);
    int in = inotify_init1(IN_CLOEXEC);
    cr_assert(in >= 0);
    cr_assert(inotify_add_watch(in, dir, IN_CLOSE_NOWRITE) >= 0);
    char cmd[3000];
    snprintf(cmd, sizeof cmd,
             "'%s' --config '%s' send imaging --to %s --patient-name 'Zhang San' "
             "--health-card 130102198001011234 --chunk-size 65536 --dicom-dir '%s' 2>&1",
             bin, cfg, H_SERVICE_CT, dir);
    FILE *ctl = popen(cmd, "r");
    cr_assert(ctl);
    int swapped = 0;
    for (int waited = 0; !swapped && waited < 30000; waited += 100) {
        struct pollfd pf = {in, POLLIN, 0};
        if (poll(&pf, 1, 100) <= 0)
            continue;
        char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
        ssize_t n = read(in, buf, sizeof buf);
        for (char *at = buf; n > 0 && at < buf + n;) {
            const struct inotify_event *ev = (const struct inotify_event *)at;
            if (!swapped && ev->len && strcmp(ev->name, "IM0002.dcm") == 0) {
                char tmp[800];
                snprintf(tmp, sizeof tmp, "%s/.swap", dir);
                /* A hard link: no symbolic link to see, only another
                 * inode. */
                cr_assert_eq(link(key, tmp), 0, "link: %s", strerror(errno));
                cr_assert_eq(rename(tmp, p2), 0);
                swapped = 1;
            }
            at += sizeof *ev + ev->len;
        }
    }
    close(in);
    char text[8192];
    size_t got = fread(text, 1, sizeof text - 1, ctl);
    text[got] = '\0';
    int status = pclose(ctl);
    cr_assert(swapped, "medlinkctl never closed IM0002.dcm:\n%s", text);
    cr_assert_neq(status, 0, "medlinkctl sent a study whose file was swapped:\n%s", text);
    cr_assert(strstr(text, "IM0002.dcm"), "the refusal does not name the file:\n%s", text);

    /* Whatever reached the reading centre, the key is not in it: once the
     * broker holds nothing more for the centre, nothing more can come. */
    h_node_counts_t q = h_wait_quiet(&W, H_READ_A, 0, 20000);
    cr_assert(q.queued == 0 && q.in_flight == 0, "broker: %lld queued, %lld in flight for %s",
              q.queued, q.in_flight, H_READ_A);
    char inbox[700], parts[700];
    h_spool(&W, H_READ_A, "inbox", inbox, sizeof inbox);
    cr_assert(!s_tree_contains(inbox, keybytes, klen), "the secret reached the reading centre");
    snprintf(parts, sizeof parts, "%s/data/%s", W.dir, H_READ_A);
    cr_assert(!s_tree_contains(parts, keybytes, klen), "the secret reached the centre's store");
    free(keybytes);
    h_agent_stop(&W, H_READ_A);
    h_broker_stop(&W);
}
