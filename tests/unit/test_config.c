/* Unit tests for medlinkd's configuration: loading, defaults, path
 * resolution, the node registry and ACL decisions, and the refusals an
 * operator gets for a broken file (each must name what is wrong). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "cases.h"
#include "config.h"
#include "ml_common.h"
#include "ml_env.h"
#include "support.h"

#define S_BROKER_OK                                                                                \
    "[broker]\n"                                                                                   \
    "id = medlinkd.zhaozhou\n"                                                                     \
    "listen = tcp://127.0.0.1:7400\n"                                                              \
    "data_dir = data/broker\n"                                                                     \
    "ca = pki/ca.crt\n"                                                                            \
    "cert = pki/medlinkd.zhaozhou.crt\n"                                                           \
    "key = /etc/medlink/medlinkd.key\n"                                                            \
    "crl =                       ; optional\n"

#define S_NODES_OK                                                                                 \
    "[node county.zhaozhou.hospital]\n"                                                            \
    "role = COUNTY_HOSPITAL\n"                                                                     \
    "community = zhaozhou\n"                                                                       \
    "name = Zhaozhou County People's Hospital\n"                                                   \
    "\n"                                                                                           \
    "[node township.xinzhai.clinic]\n"                                                             \
    "role = TOWNSHIP_CLINIC\n"                                                                     \
    "community = zhaozhou\n"                                                                       \
    "\n"                                                                                           \
    "[node township.fanzhuang.clinic]\n"                                                           \
    "role = TOWNSHIP_CLINIC\n"                                                                     \
    "\n"                                                                                           \
    "[node city.shijiazhuang.hospital]\n"                                                          \
    "role = city_hospital\n"

#define S_ACL_OK                                                                                   \
    "[acl TOWNSHIP_CLINIC]\n"                                                                      \
    "REFERRAL = COUNTY_HOSPITAL CITY_HOSPITAL\n"                                                   \
    "REFERRAL_UPDATE = COUNTY_HOSPITAL, CITY_HOSPITAL\n"                                           \
    "\n"                                                                                           \
    "[acl COUNTY_HOSPITAL]\n"                                                                      \
    "REFERRAL = CITY_HOSPITAL\n"                                                                   \
    "REFERRAL_UPDATE = TOWNSHIP_CLINIC VILLAGE_CLINIC\n"

static char s_dir[256];
static char s_path[512];

/* Writes text to <tmpdir>/medlinkd.ini and returns the path. */
static const char *s_write(const char *text)
{
    ml_test_tmpdir(s_dir, sizeof s_dir);
    snprintf(s_path, sizeof s_path, "%s/medlinkd.ini", s_dir);
    FILE *f = fopen(s_path, "w");
    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
    return s_path;
}

static ml_broker_config_t *s_load_ok(const char *text)
{
    ml_broker_config_t *cfg = NULL;
    char err[512] = "";
    int rc = ml_broker_config_load(s_write(text), &cfg, err, sizeof err);
    cr_assert_eq(rc, 0, "load failed: %s", err);
    cr_assert_not_null(cfg);
    return cfg;
}

/* Loading text must fail with ML_ECONFIG and an error containing each of
 * the NULL-terminated strings. */
static void s_refused(const char *text, ...)
{
    ml_broker_config_t *cfg = NULL;
    char err[512] = "";
    int rc = ml_broker_config_load(s_write(text), &cfg, err, sizeof err);
    cr_assert_eq(rc, ML_ECONFIG, "expected ML_ECONFIG, got %d (%s)", rc, err);
    cr_assert_null(cfg);
    va_list ap;
    va_start(ap, text);
    for (const char *want; (want = va_arg(ap, const char *));)
        cr_assert(strstr(err, want), "error \"%s\" does not contain \"%s\"", err, want);
    va_end(ap);
}

Test(config, full_config_loads_with_defaults_and_resolved_paths)
{
    ml_broker_config_t *cfg = s_load_ok(S_BROKER_OK S_NODES_OK S_ACL_OK);
    char want[700];
    cr_assert_str_eq(cfg->broker_id, "medlinkd.zhaozhou");
    cr_assert_str_eq(cfg->listen, "tcp://127.0.0.1:7400");
    cr_assert_str_eq(cfg->path, s_path);
    /* Relative paths hang off the file's folder; absolute ones are kept. */
    char real[512];
    cr_assert_not_null(realpath(s_dir, real));
    snprintf(want, sizeof want, "%s/data/broker", real);
    cr_assert_str_eq(cfg->data_dir, want);
    snprintf(want, sizeof want, "%s/pki/ca.crt", real);
    cr_assert_str_eq(cfg->ca, want);
    snprintf(want, sizeof want, "%s/pki/medlinkd.zhaozhou.crt", real);
    cr_assert_str_eq(cfg->cert, want);
    cr_assert_str_eq(cfg->key, "/etc/medlink/medlinkd.key");
    cr_assert_null(cfg->crl);
    cr_assert_eq(cfg->log_level, ML_LOG_INFO);
    cr_assert_eq(cfg->max_record, 4194304);
    cr_assert_eq(cfg->heartbeat_ms, 2000);
    cr_assert_eq(cfg->session_timeout_ms, 10000);
    cr_assert_eq(cfg->handshake_timeout_ms, 5000);
    cr_assert_eq(cfg->max_sessions, 4096);
    cr_assert_eq(cfg->session_buffer, 8388608);
    cr_assert_eq(cfg->delivery_window, 256);
    cr_assert_eq(cfg->ack_timeout_ms, 30000);
    cr_assert_eq(cfg->n_nodes, 4);
    ml_broker_config_destroy(&cfg);
    cr_assert_null(cfg);
    ml_broker_config_destroy(&cfg);
}

Test(config, explicit_values_override_defaults)
{
    ml_broker_config_t *cfg =
        s_load_ok("[broker]\nlisten = tcp://0.0.0.0:7400\ndata_dir = /var/lib/medlink\n"
                  "ca = /c\ncert = /d\nkey = /e\ncrl = pki/ca.crl\nlog_level = debug\n"
                  "heartbeat_ms = 500\nsession_timeout_ms = 1500\ndelivery_window = 8\n"
                  "max_record = 65536\nsession_buffer = 65536\nack_timeout_ms = 1000\n");
    cr_assert_str_eq(cfg->broker_id, "medlinkd");
    cr_assert_eq(cfg->log_level, ML_LOG_DEBUG);
    cr_assert_eq(cfg->heartbeat_ms, 500);
    cr_assert_eq(cfg->session_timeout_ms, 1500);
    cr_assert_eq(cfg->delivery_window, 8);
    cr_assert_eq(cfg->max_record, 65536);
    cr_assert_not_null(cfg->crl);
    cr_assert(strstr(cfg->crl, "/pki/ca.crl"));
    cr_assert_eq(cfg->n_nodes, 0);
    ml_broker_config_destroy(&cfg);
}

/* [broker] port_file: optional (NULL when absent), a path resolved like the
 * others; listen may ask for port 0 (the system picks one, which medlinkd
 * then writes to the port file). */
Test(config, port_file_and_listen_port_zero)
{
    ml_broker_config_t *cfg = s_load_ok(S_BROKER_OK S_NODES_OK S_ACL_OK);
    cr_assert_null(cfg->port_file);
    ml_broker_config_destroy(&cfg);
    cfg = s_load_ok("[broker]\nlisten = tcp://127.0.0.1:0\nport_file = run/medlinkd.port\n"
                    "data_dir = d\nca = /c\ncert = /d\nkey = /e\n");
    cr_assert_str_eq(cfg->listen, "tcp://127.0.0.1:0");
    char real[512], want[700];
    cr_assert_not_null(realpath(s_dir, real));
    snprintf(want, sizeof want, "%s/run/medlinkd.port", real);
    cr_assert_str_eq(cfg->port_file, want);
    ml_broker_config_destroy(&cfg);
    cfg = s_load_ok("[broker]\nlisten = tcp://127.0.0.1:0\nport_file = /run/medlink/port\n"
                    "data_dir = d\nca = /c\ncert = /d\nkey = /e\n");
    cr_assert_str_eq(cfg->port_file, "/run/medlink/port");
    ml_broker_config_destroy(&cfg);
    /* Empty means none, as for crl. */
    cfg = s_load_ok("[broker]\nlisten = tcp://127.0.0.1:0\nport_file =\n"
                    "data_dir = d\nca = /c\ncert = /d\nkey = /e\n");
    cr_assert_null(cfg->port_file);
    ml_broker_config_destroy(&cfg);
}

Test(config, node_lookup)
{
    ml_broker_config_t *cfg = s_load_ok(S_BROKER_OK S_NODES_OK S_ACL_OK);
    const ml_node_t *n = ml_broker_config_node(cfg, "county.zhaozhou.hospital");
    cr_assert_not_null(n);
    cr_assert_eq(n->role, ML_ROLE_COUNTY_HOSPITAL);
    cr_assert_str_eq(n->community, "zhaozhou");
    cr_assert_str_eq(n->display_name, "Zhaozhou County People's Hospital");
    n = ml_broker_config_node(cfg, "township.fanzhuang.clinic");
    cr_assert_not_null(n);
    cr_assert_eq(n->role, ML_ROLE_TOWNSHIP_CLINIC);
    cr_assert_null(n->community);
    cr_assert_null(n->display_name);
    n = ml_broker_config_node(cfg, "city.shijiazhuang.hospital");
    cr_assert_not_null(n);
    cr_assert_eq(n->role, ML_ROLE_CITY_HOSPITAL);
    cr_assert_null(ml_broker_config_node(cfg, "nowhere"));
    cr_assert_null(ml_broker_config_node(cfg, "county.zhaozhou"));
    ml_broker_config_destroy(&cfg);
}

Test(config, missing_required_keys_refused)
{
    s_refused("[broker]\ndata_dir = d\nca = a\ncert = b\nkey = c\n", "medlinkd.ini",
              "[broker] listen is required", NULL);
    s_refused("[broker]\nlisten = tcp://127.0.0.1:1\nca = a\ncert = b\nkey = c\n",
              "[broker] data_dir is required", NULL);
    s_refused("[broker]\nlisten = tcp://127.0.0.1:1\ndata_dir = d\ncert = b\nkey = c\n",
              "[broker] ca is required", NULL);
    s_refused("[broker]\nlisten = tcp://127.0.0.1:1\ndata_dir = d\nca = a\nkey = c\n",
              "[broker] cert is required", NULL);
    s_refused("[broker]\nlisten = tcp://127.0.0.1:1\ndata_dir = d\nca = a\ncert = b\n",
              "[broker] key is required", NULL);
}

Test(config, bad_values_refused)
{
    s_refused(S_BROKER_OK "heartbeat_ms = 5\n", "medlinkd.ini:", "heartbeat_ms", "out of range",
              NULL);
    s_refused(S_BROKER_OK "max_sessions = lots\n", "max_sessions", "not a whole number", NULL);
    s_refused(S_BROKER_OK "log_level = chatty\n", "log_level", NULL);
    s_refused(S_BROKER_OK "hearbeat_ms = 2000\n", "[broker] hearbeat_ms: unknown key", NULL);
    s_refused(S_BROKER_OK "session_timeout_ms = 1000\n", "session_timeout_ms", "heartbeat_ms",
              NULL);
    s_refused(S_BROKER_OK "id = bad id\n", "[broker] id", NULL);
}

Test(config, unknown_role_refused)
{
    s_refused(S_BROKER_OK "[node a.b]\nrole = HOSPITAL\n", "[node a.b] role = HOSPITAL",
              "unknown role", NULL);
    s_refused(S_BROKER_OK "[node a.b]\ncommunity = x\n", "[node a.b] role is required", NULL);
    s_refused(S_BROKER_OK "[node a.b]\nrole = OPS\ncolour = red\n", "[node a.b] colour", NULL);
    s_refused(S_BROKER_OK S_NODES_OK "[acl PHARMACY]\nREFERRAL = COUNTY_HOSPITAL\n",
              "[acl PHARMACY]", "unknown role PHARMACY", NULL);
    s_refused(S_BROKER_OK S_NODES_OK "[acl TOWNSHIP_CLINIC]\nREFERRAL = COUNTY_HOSPITAL DENTIST\n",
              "[acl TOWNSHIP_CLINIC] REFERRAL", "unknown role \"DENTIST\"", NULL);
}

Test(config, unknown_kind_refused)
{
    s_refused(S_BROKER_OK "[acl TOWNSHIP_CLINIC]\nREFERAL = COUNTY_HOSPITAL\n",
              "[acl TOWNSHIP_CLINIC] REFERAL", "unknown message kind", NULL);
    /* Control kinds are not routed, so an ACL line for them is a mistake. */
    s_refused(S_BROKER_OK "[acl TOWNSHIP_CLINIC]\nHEARTBEAT = COUNTY_HOSPITAL\n",
              "[acl TOWNSHIP_CLINIC] HEARTBEAT", "not a routed kind", NULL);
}

Test(config, duplicate_node_refused)
{
    s_refused(S_BROKER_OK S_NODES_OK "[node township.xinzhai.clinic]\nrole = VILLAGE_CLINIC\n",
              "node township.xinzhai.clinic", "twice", NULL);
    /* The same id with other spacing is still the same node. */
    s_refused(S_BROKER_OK "[node a.b]\nrole = OPS\n[node   a.b]\nrole = OPS\n", "node a.b",
              "defined twice", NULL);
    s_refused(S_BROKER_OK "[node a b]\nrole = OPS\n", "node id \"a b\"", NULL);
}

Test(config, syntax_error_names_file_and_line)
{
    s_refused(S_BROKER_OK "\n[node x\nrole = OPS\n", "medlinkd.ini:10:", NULL);
}

Test(config, missing_file_refused)
{
    ml_broker_config_t *cfg = NULL;
    char err[512] = "";
    cr_assert_eq(ml_broker_config_load("/nonexistent/medlinkd.ini", &cfg, err, sizeof err),
                 ML_ECONFIG);
    cr_assert(strstr(err, "cannot open /nonexistent/medlinkd.ini"), "%s", err);
}

Test(acl, decisions_follow_the_config)
{
    ml_broker_config_t *cfg = s_load_ok(S_BROKER_OK S_NODES_OK S_ACL_OK);
    const int ref = MEDLINK__V1__KIND__KIND_REFERRAL;
    const int upd = MEDLINK__V1__KIND__KIND_REFERRAL_UPDATE;

    cr_assert(ml_acl_allows(cfg, ML_ROLE_TOWNSHIP_CLINIC, ref, ML_ROLE_COUNTY_HOSPITAL));
    cr_assert(ml_acl_allows(cfg, ML_ROLE_TOWNSHIP_CLINIC, ref, ML_ROLE_CITY_HOSPITAL));
    cr_assert(!ml_acl_allows(cfg, ML_ROLE_TOWNSHIP_CLINIC, ref, ML_ROLE_TOWNSHIP_CLINIC));
    cr_assert(!ml_acl_allows(cfg, ML_ROLE_TOWNSHIP_CLINIC, ref, ML_ROLE_VILLAGE_CLINIC));
    cr_assert(ml_acl_allows(cfg, ML_ROLE_TOWNSHIP_CLINIC, upd, ML_ROLE_CITY_HOSPITAL));

    cr_assert(ml_acl_allows(cfg, ML_ROLE_COUNTY_HOSPITAL, upd, ML_ROLE_TOWNSHIP_CLINIC));
    cr_assert(ml_acl_allows(cfg, ML_ROLE_COUNTY_HOSPITAL, upd, ML_ROLE_VILLAGE_CLINIC));
    cr_assert(!ml_acl_allows(cfg, ML_ROLE_COUNTY_HOSPITAL, ref, ML_ROLE_TOWNSHIP_CLINIC));
    cr_assert(!ml_acl_allows(cfg, ML_ROLE_COUNTY_HOSPITAL, upd, ML_ROLE_CITY_HOSPITAL));
    cr_assert(ml_acl_allows(cfg, ML_ROLE_COUNTY_HOSPITAL, ref, ML_ROLE_CITY_HOSPITAL));

    /* Roles with no [acl] section may send nothing. */
    cr_assert(!ml_acl_allows(cfg, ML_ROLE_CITY_HOSPITAL, upd, ML_ROLE_COUNTY_HOSPITAL));
    cr_assert(!ml_acl_allows(cfg, ML_ROLE_VILLAGE_CLINIC, ref, ML_ROLE_COUNTY_HOSPITAL));
    /* Control kinds and nonsense arguments are never allowed. */
    cr_assert(!ml_acl_allows(cfg, ML_ROLE_TOWNSHIP_CLINIC, MEDLINK__V1__KIND__KIND_HELLO,
                             ML_ROLE_COUNTY_HOSPITAL));
    cr_assert(!ml_acl_allows(cfg, ML_ROLE_UNKNOWN, ref, ML_ROLE_COUNTY_HOSPITAL));
    cr_assert(!ml_acl_allows(cfg, ML_ROLE_TOWNSHIP_CLINIC, ref, ML_ROLE_COUNT));
    cr_assert(!ml_acl_allows(cfg, ML_ROLE_TOWNSHIP_CLINIC, 1000, ML_ROLE_COUNTY_HOSPITAL));
    cr_assert(!ml_acl_allows(cfg, -1, ref, ML_ROLE_COUNTY_HOSPITAL));
    ml_broker_config_destroy(&cfg);
}

Test(acl, kind_names_accept_short_long_and_lower_case)
{
    ml_broker_config_t *cfg =
        s_load_ok(S_BROKER_OK "[acl VILLAGE_CLINIC]\nkind_referral = township_clinic\n"
                              "referral = COUNTY_HOSPITAL\n");
    const int ref = MEDLINK__V1__KIND__KIND_REFERRAL;
    /* A repeated kind adds to the earlier line. */
    cr_assert(ml_acl_allows(cfg, ML_ROLE_VILLAGE_CLINIC, ref, ML_ROLE_TOWNSHIP_CLINIC));
    cr_assert(ml_acl_allows(cfg, ML_ROLE_VILLAGE_CLINIC, ref, ML_ROLE_COUNTY_HOSPITAL));
    cr_assert(!ml_acl_allows(cfg, ML_ROLE_VILLAGE_CLINIC, ref, ML_ROLE_OPS));
    ml_broker_config_destroy(&cfg);
}

Test(acl, role_names)
{
    int r = -1;
    cr_assert_str_eq(ml_role_name(ML_ROLE_IMAGING_CENTRE), "IMAGING_CENTRE");
    cr_assert_str_eq(ml_role_name(ML_ROLE_OPS), "OPS");
    cr_assert_str_eq(ml_role_name(99), "UNKNOWN");
    cr_assert_eq(ml_role_parse("VILLAGE_CLINIC", &r), 0);
    cr_assert_eq(r, ML_ROLE_VILLAGE_CLINIC);
    cr_assert_eq(ml_role_parse("UNKNOWN", &r), ML_EINVAL);
    cr_assert_eq(ml_role_parse("", &r), ML_EINVAL);
}

/* ---- services, deadlines, escalation, communities ---------------------- */

#define S_WORKFLOWS_OK                                                                             \
    "[node reading.a.imaging]\nrole = IMAGING_CENTRE\nservices = imaging.ct, imaging.dr\n\n"       \
    "[node reading.b.imaging]\nrole = IMAGING_CENTRE\nservices = imaging.ct\n\n"                   \
    "[deadlines]\n"                                                                                \
    "referral = ACCEPTED 1h\n"                                                                     \
    "referral.emergency = ACCEPTED 15m\n"                                                          \
    "imaging.urgent = REPORTED 4h\n"                                                               \
    "down_transfer = ARRIVED 3d after ACCEPTED\n\n"                                                \
    "[escalation]\nnotify = county.zhaozhou.hospital\nredirect_emergency = no\n\n"                 \
    "[community zhaozhou]\nfallback = city.shijiazhuang.hospital\n"

Test(config, services_deadlines_escalation_and_fallbacks)
{
    ml_broker_config_t *cfg =
        s_load_ok(S_BROKER_OK "timer_ms = 250\nnotify_delivered = off\nmax_delivery_attempts = 3\n"
                              "\n" S_NODES_OK S_WORKFLOWS_OK);
    cr_assert_eq(cfg->timer_ms, 250);
    cr_assert_eq(cfg->notify_delivered, 0);
    cr_assert_eq(cfg->max_delivery_attempts, 3);
    const ml_node_t *a = ml_broker_config_node(cfg, "reading.a.imaging");
    cr_assert_eq(a->n_services, 2);
    cr_assert(ml_node_serves(a, "imaging.dr"));
    cr_assert(ml_broker_config_is_service(cfg, "imaging.ct"));
    cr_assert_not(ml_broker_config_is_service(cfg, "imaging.mr"));
    cr_assert_not(ml_broker_config_is_service(cfg, "reading.a.imaging"));

    /* A line for one priority wins over the line for all of them. */
    const ml_deadline_rule_t *r = ml_broker_config_deadline(cfg, ML_CASE_REFERRAL, 2);
    cr_assert(r->set);
    cr_assert_eq(r->ms, 15 * 60000);
    r = ml_broker_config_deadline(cfg, ML_CASE_REFERRAL, 0);
    cr_assert_eq(r->ms, 3600000);
    cr_assert_eq(r->after_state, 0);
    r = ml_broker_config_deadline(cfg, ML_CASE_IMAGING, 0);
    cr_assert_not(r->set);
    r = ml_broker_config_deadline(cfg, ML_CASE_IMAGING, 1);
    cr_assert(r->set);
    r = ml_broker_config_deadline(cfg, ML_CASE_DOWN_TRANSFER, 2);
    cr_assert_eq(r->ms, 3 * 86400000LL);
    cr_assert_eq(r->after_state, MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_ACCEPTED);
    cr_assert_eq(r->target_state, MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_ARRIVED);

    cr_assert_eq(cfg->n_escalate_to, 1);
    cr_assert_str_eq(cfg->escalate_to[0], "county.zhaozhou.hospital");
    cr_assert_eq(cfg->redirect_emergency, 0);
    cr_assert_str_eq(ml_broker_config_fallback(cfg, "zhaozhou"), "city.shijiazhuang.hospital");
    cr_assert_null(ml_broker_config_fallback(cfg, "elsewhere"));
    ml_broker_config_destroy(&cfg);

    /* Without those sections: no deadlines, every OPS node, redirects on. */
    cfg = s_load_ok(S_BROKER_OK S_NODES_OK);
    cr_assert_not(ml_broker_config_deadline(cfg, ML_CASE_REFERRAL, 2)->set);
    cr_assert_eq(cfg->n_escalate_to, 0);
    cr_assert_eq(cfg->redirect_emergency, 1);
    cr_assert_eq(cfg->notify_delivered, 1);
    cr_assert_eq(cfg->max_delivery_attempts, 10);
    ml_broker_config_destroy(&cfg);
}

Test(config, workflow_sections_refuse_mistakes)
{
    s_refused(S_BROKER_OK "[node a.b]\nrole = IMAGING_CENTRE\nservices = county.zhaozhou.hospital\n"
                          "\n" S_NODES_OK,
              "is also a node id", NULL);
    s_refused(S_BROKER_OK "[node a.b]\nrole = IMAGING_CENTRE\nservices = imaging/ct\n", "services",
              "imaging/ct", NULL);
    s_refused(S_BROKER_OK "[deadlines]\nreferal = ACCEPTED 15m\n", "[deadlines] referal",
              "unknown case kind", NULL);
    s_refused(S_BROKER_OK "[deadlines]\nreferral.critical = ACCEPTED 15m\n", "unknown priority",
              "critical", NULL);
    s_refused(S_BROKER_OK "[deadlines]\nreferral = ACCEPTD 15m\n", "ACCEPTD",
              "not a state of a referral case", NULL);
    s_refused(S_BROKER_OK "[deadlines]\nreferral = ACCEPTED 15\n", "needs a number and a unit",
              NULL);
    s_refused(S_BROKER_OK "[deadlines]\nreferral = ACCEPTED\n", "STATE DURATION", NULL);
    s_refused(S_BROKER_OK "[deadlines]\nreferral = SENT 1h\n", "could never run", NULL);
    s_refused(S_BROKER_OK "[deadlines]\ndown_transfer = ACCEPTED 3d after ARRIVED\n",
              "could never run", NULL);
    s_refused(S_BROKER_OK S_NODES_OK "[escalation]\nnotify = ops.nowhere\n", "[escalation] notify",
              "ops.nowhere is not a registered node", NULL);
    s_refused(S_BROKER_OK S_NODES_OK "[escalation]\nredirect_emergency = maybe\n",
              "expected yes or no", NULL);
    s_refused(S_BROKER_OK S_NODES_OK "[escalation]\nnotfy = x\n", "notfy: unknown key", NULL);
    s_refused(S_BROKER_OK S_NODES_OK "[community zhaozhou]\nfallback = city.nowhere\n",
              "[community zhaozhou] fallback", "not a registered node", NULL);
    s_refused(S_BROKER_OK S_NODES_OK "[community zhaozhou]\nfalback = x\n", "falback", NULL);
}

Test(config, durations)
{
    int64_t ms = 0;
    cr_assert_eq(ml_duration_parse("500ms", &ms), 0);
    cr_assert_eq(ms, 500);
    cr_assert_eq(ml_duration_parse("30s", &ms), 0);
    cr_assert_eq(ms, 30000);
    cr_assert_eq(ml_duration_parse("15m", &ms), 0);
    cr_assert_eq(ms, 900000);
    cr_assert_eq(ml_duration_parse("2h", &ms), 0);
    cr_assert_eq(ms, 7200000);
    cr_assert_eq(ml_duration_parse("3d", &ms), 0);
    cr_assert_eq(ms, 259200000);
    const char *bad[] = {"", "m", "15", "15x", "-1m", "1.5h", "15 m", NULL};
    for (int i = 0; bad[i]; i++)
        cr_assert_eq(ml_duration_parse(bad[i], &ms), ML_EINVAL, "\"%s\" should be refused", bad[i]);
}
