/* Integration-test harness: a whole medlink community on 127.0.0.1 in a
 * temp folder. It makes a PKI with deploy/pki.sh, writes broker and agent
 * configs, starts the real medlinkd and medlink-agent binaries as child
 * processes (logs in the temp folder), and offers the checks a person would
 * make: files in spool folders, rows in the real SQLite files. Processes are
 * ended only by the PIDs this harness started. */
#ifndef ML_HARNESS_H
#define ML_HARNESS_H

#include <stddef.h>
#include <sys/types.h>

#define H_BROKER "medlinkd.test"
#define H_COUNTY "county.zhaozhou.hospital"
#define H_XINZHAN "township.xinzhan.clinic"
#define H_FENGLE "township.fengle.clinic"
#define H_OPS "ops.zhaozhou.admin"
#define H_CITY "city.shijiazhuang.hospital" /* the community's fallback hospital */
#define H_READ_A "reading.a.imaging"        /* serves imaging.ct */
#define H_READ_B "reading.b.imaging"        /* serves imaging.ct */
#define H_SERVICE_CT "imaging.ct"

typedef struct {
    char dir[512]; /* temp folder of this community */
    char pki[600];
    int port;            /* the broker's port: 0 until h_broker_start read it */
    char endpoint[64];   /* "tcp://127.0.0.1:PORT" (":0" until then) */
    char listen[64];     /* what the config's [broker] listen line says */
    char port_file[600]; /* where medlinkd writes the ports it bound */
    pid_t broker;
    pid_t agents[8];
    char agent_ids[8][64];
    int n_agents;
    int broker_starts;
    struct h_link *link;    /* the slow link, once h_link_start made it */
    char link_endpoint[64]; /* where agents connect to go through it */
    int http_on;            /* the config has an [http] listen */
    int http_port;          /* the broker's HTTP port, learnt by h_broker_start (0: off) */
} h_world_t;

/* Lines for the [http] section of the broker configs h_world_init writes
 * after it is set (e.g. "tls = yes\nmax_connections = 3"). Without a listen
 * line of its own the section has "listen = 127.0.0.1:0", a port the
 * system picks, so that tests in parallel never collide; h_broker_start
 * reads the port from the port file's http= line into w->http_port. "listen =" turns the endpoint
 * off. A test sets it before h_world_init and clears it (NULL: nothing but the listen line). An
 * extra_broker_ini of h_world_init that has an [http] section of its own
 * replaces all of this. */
extern const char *h_http_ini;

/* Makes the folder, PKI (CA + broker, county, two clinics, ops) and the
 * broker config. Aborts the test on failure. extra_broker_ini is appended
 * to the [broker] section (may be NULL). */
void h_world_init(h_world_t *w, const char *extra_broker_ini);
/* Kills (SIGKILL) whatever is still running; keeps the folder for logs. */
void h_world_fini(h_world_t *w);

/* Starts medlinkd and waits until it has written its port file
 * ([broker] port_file, after the bind and before READY=1), then reads the
 * ports into w->port, w->endpoint and w->http_port. The config asks for
 * port 0, so the first start gets a port the system picks, race-free; the
 * config's listen line is then pinned to that port, so that a restart
 * binds it again and the agents find their broker where they were told it
 * is (see harness.c). A test that rewrites the line itself (sed on
 * "listen = " w->listen) keeps its own. */
void h_broker_start(h_world_t *w);
/* For a test that must configure agents before the broker ever runs:
 * starts and stops medlinkd once, so that w->port and w->endpoint are
 * known (and pinned as above). Nothing when they already are. */
void h_broker_pin_port(h_world_t *w);
/* Reads w->port_file: *port the broker's, *http_port (may be NULL) the
 * HTTP endpoint's (0 when the file has no http= line). Returns 0, or -1
 * when there is no file (yet) or no broker= line in it. */
int h_port_file_read(const h_world_t *w, int *port, int *http_port);
/* SIGTERM and wait; asserts exit status 0. */
void h_broker_stop(h_world_t *w);
void h_broker_kill(h_world_t *w);

/* Lines appended to the [agent] section of every agent config written
 * after it is set (NULL: none); a test sets it and clears it. */
extern const char *h_agent_extra_ini;
/* Writes an agent config for node and starts it; returns its index. */
int h_agent_start(h_world_t *w, const char *node);
/* The same, with extra lines (e.g. "incoming_expire_s = 3\n") appended to
 * the agent's [agent] section. */
int h_agent_start_ini(h_world_t *w, const char *node, const char *extra_ini);
/* The same, with the agent connecting to endpoint instead of the broker's
 * (w->link_endpoint: through the slow link). */
int h_agent_start_at(h_world_t *w, const char *node, const char *endpoint);
/* A slow uplink, as a township's: a TCP relay on 127.0.0.1, run by a thread
 * of the test, that passes bytes towards the broker at most up_bytes_per_s
 * (bursts of 50 ms) and the other way unthrottled. An agent started with
 * h_agent_start_at(w, node, w->link_endpoint) goes through it; when either
 * side closes, the relay drops the other side and whatever it held, as a
 * broken link would. Asserts on failure; h_world_fini stops it. */
void h_link_start(h_world_t *w, long up_bytes_per_s);
void h_agent_stop(h_world_t *w, const char *node);
void h_agent_kill(h_world_t *w, const char *node);

/* Spool folder of node's agent: dir/spool/<node>/<sub> into out. */
void h_spool(const h_world_t *w, const char *node, const char *sub, char *out, size_t len);
/* Writes content to <spool>/outbox/<name> atomically (temp + rename), the
 * way a hospital system is told to. */
void h_drop(const h_world_t *w, const char *node, const char *name, const char *content);
/* Path (malloc'd) of the first *.json file in a spool sub folder whose
 * text contains needle, or NULL. */
char *h_find_json(const h_world_t *w, const char *node, const char *sub, const char *needle);
/* Waits up to timeout_ms for h_find_json to find one; returns it or NULL. */
char *h_wait_json(const h_world_t *w, const char *node, const char *sub, const char *needle,
                  int timeout_ms);
/* Counts *.json files in a spool sub folder. */
int h_count(const h_world_t *w, const char *node, const char *sub);
/* Waits up to timeout_ms until h_count(...) >= n; returns the last count. */
int h_wait_count(const h_world_t *w, const char *node, const char *sub, int n, int timeout_ms);
/* Reads a whole file into a malloc'd string (NULL if missing). */
char *h_slurp(const char *path);
/* Runs a command with stdout captured into a malloc'd string; returns the
 * exit status in *status. */
char *h_run(int *status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Path of a built binary (medlinkd, medlink-agent, medlinkctl). */
const char *h_bin(const char *name, char *out, size_t len);
/* Writes a medlinkctl config for node (cert of that node) to out path. */
void h_ctl_config(const h_world_t *w, const char *node, char *out, size_t len);

/* ---- medlinkctl, and questions to the broker ---------------------------- */

struct json_t;
/* Runs medlinkctl --config cfg args (args: the rest of its command line,
 * shell words) with stderr folded into stdout and env (may be NULL: none)
 * in front as "env ENV ..." (e.g. "TZ=Asia/Shanghai", "-u TZ"); *status
 * gets the exit status. Returns the output (malloc'd, the caller's). */
char *h_ctl_run(int *status, const char *env, const char *cfg, const char *args);
/* h_ctl_run without env, asserting that the exit status is want. */
char *h_ctl(int want, const char *cfg, const char *args);
/* h_ctl with env, as for h_ctl_run. */
char *h_ctl_env(int want, const char *env, const char *cfg, const char *args);
/* medlinkctl --json args (stdout only): asserts exit status 0 and one JSON
 * document, and returns it (the caller's json_decref). */
struct json_t *h_ctl_json(const char *cfg, const char *args);
/* Repeats h_ctl_json(cfg, args) until the array under key has at least n
 * entries (every 200 ms, up to timeout_ms); returns that document, or NULL
 * on the timeout. */
struct json_t *h_ctl_wait_list(const char *cfg, const char *args, const char *key, size_t n,
                               int timeout_ms);
/* h_ctl_wait_list for the dead-letter queue ("dlq list", "deadLetter") and
 * for the overdue cases ("cases --overdue" followed by filter, which may be
 * NULL or e.g. "--kind down_transfer"). */
struct json_t *h_wait_dead_letters(const char *cfg, size_t n, int timeout_ms);
struct json_t *h_wait_overdue(const char *cfg, const char *filter, size_t n, int timeout_ms);
/* A uint64 of proto3 JSON (a string, or a number) as a number; -1 when key
 * is missing. */
long long h_json_u64(struct json_t *j, const char *key);

/* The broker's own counts for node, from its admin status (OP_STATUS via
 * medlinkctl --json status with the OPS certificate). */
typedef struct {
    long long queued;    /* messages waiting for node */
    long long in_flight; /* sent to node, not yet acknowledged */
    long long delivered; /* acknowledged by node since the broker started */
} h_node_counts_t;
/* Waits up to timeout_ms until the broker has nothing left for node
 * (queued = 0, in_flight = 0) and has delivered at least `delivered`
 * messages to it since it started, and returns the counts it saw last.
 * This is the question to ask instead of sleeping a while to show that
 * something did not happen: once the broker says it holds nothing more
 * for node, whatever node's inbox holds is all it will ever get, and the
 * test counts it. The caller asserts the counts (delivered == n when a
 * duplicate must not have been delivered). Asserts the status could be
 * asked. Send first and wait for the sender's Accepted (or its sent/
 * folder), so that the message is in the broker before the question. */
h_node_counts_t h_wait_quiet(h_world_t *w, const char *node, long long delivered, int timeout_ms);

/* A referral JSON (Envelope form) to `to`, with a given patient name. */
char *h_referral_json(const char *to, const char *patient, const char *priority);
/* The keyring a store of the world seals with (h_world_init and
 * h_agent_start give every store a key): the broker's for H_BROKER, else
 * node's agent's. The caller destroys it. Asserts on failure. */
struct ml_keyring *h_store_keys(const h_world_t *w, const char *node);
/* Sum of matches of needle in a log file of the world (broker.log, agent-<node>.log). */
int h_log_contains(const h_world_t *w, const char *log, const char *needle);
void h_sleep_ms(int ms);

/* A tiny blocking HTTP/1.0 client over 127.0.0.1: sends request (the raw
 * bytes, e.g. "GET / HTTP/1.0\r\n\r\n") to port and reads until the server
 * closes or timeout_ms pass. *reply (malloc'd, NUL-terminated, caller
 * frees) and *len get what came back. Returns 0, or -1 when it could not
 * connect or send (nothing in *reply then), or -2 on the timeout (what came
 * until then is in *reply). */
int h_http_raw(int port, const char *request, size_t reqlen, char **reply, size_t *len,
               int timeout_ms);
/* GET path from the broker's HTTP endpoint (w->http_port) with HTTP/1.0 and
 * a 10 s timeout: *status is the reply's status (0 if none could be read),
 * *body (malloc'd, NUL-terminated; may be NULL when not wanted) and *len
 * (may be NULL) its body. Returns 0 once a reply came, -1 otherwise. */
int h_http_get(const h_world_t *w, const char *path, int *status, char **body, size_t *len);
/* The same with extra request header lines, each ending in "\r\n" (e.g.
 * "Accept-Language: zh-CN\r\n"; NULL: none); *head (may be NULL) gets the
 * reply's status line and headers (malloc'd). */
int h_http_get_hdr(const h_world_t *w, const char *path, const char *headers, int *status,
                   char **head, char **body, size_t *len);

#endif
