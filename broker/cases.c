/* Case lifecycles: the transition tables of cases.h as data, one per case
 * kind (upward referral, imaging consult, rehab down-transfer), the checks
 * over them, the messages that travel in a case without moving it, and the
 * state names, ranks and FHIR Task.status mapping. The tables are the one
 * statement of the lifecycles in code; the comment in cases.h and
 * docs/workflows.md describe them, and tests/unit/test_cases.c states them
 * again independently and compares. */
#include "cases.h"

#include "ml_common.h"
#include "medlink/v1/envelope.pb-c.h"
#include "medlink/v1/imaging.pb-c.h"
#include "medlink/v1/referral.pb-c.h"
#include "medlink/v1/transfer.pb-c.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

/* Short names so that the tables below read like the ones in cases.h. */
#define R_(x) MEDLINK__V1__REFERRAL_STATUS__REFERRAL_##x
#define I_(x) MEDLINK__V1__IMAGING_STATUS__IMAGING_##x
#define D_(x) MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_##x
#define K_(x) MEDLINK__V1__KIND__KIND_##x

#define M_BROKER (1u << ML_PARTY_BROKER)
#define M_OPENER (1u << ML_PARTY_OPENER)
#define M_TARGET (1u << ML_PARTY_TARGET)

/* One past the highest value of each status enum. test_cases.c checks them
 * against the enum descriptors, so a state added to the proto fails the
 * tests until this file has decided what the new state may follow and lead
 * to, how it ranks and what FHIR calls it. */
#define R_COUNT (R_(CANCELLED) + 1)
#define I_COUNT (I_(CLOSED) + 1)
#define D_COUNT (D_(CANCELLED) + 1)

/* The states a message is accepted in are a bit mask of 1 << state. */
_Static_assert(R_COUNT <= 32 && I_COUNT <= 32 && D_COUNT <= 32, "state masks are 32 bits");

/* How a refusal names the broker's part in the steps only it makes. */
#define B_DELIVERY "the broker (on delivery)"
#define B_FALLBACK "the broker (deadline fallback)"
#define B_LINKED "the broker (from a linked referral)"

typedef struct {
    int from;
    int to;
    unsigned parties;   /* M_* bits of the parties that may make this step */
    const char *broker; /* how a refusal names the broker, if M_BROKER is set */
} ml_case_step_t;

/* Everything about one kind of case that the functions below need. */
typedef struct {
    const char *name;                     /* ml_case_kind_name */
    const char *words;                    /* "a referral", in sentences */
    const char *kind_enum;                /* its CaseKind spelling */
    const ProtobufCEnumDescriptor *enumd; /* the status enum, for names */
    const char *prefix;                   /* of its state names */
    int initial;                          /* the state a case is opened in */
    int count;                            /* one past the highest state */
    const ml_case_step_t *steps;
    size_t n_steps;
    const int *rank;          /* [count] */
    const char *const *fhir;  /* [count] */
    const char *opener_words; /* the opener and the target in refusals */
    const char *target_words;
} ml_case_life_t;

/* ---- upward referral --------------------------------------------------- */

/* Every legal step, one row per (from, to) pair. Who may make a step depends
 * mostly on the state it leads to, but keeping the mask per row lets a step
 * break that rule without changing the code (REDIRECTED is the target's
 * hand-on and also the broker's fallback when a deadline passes). */
static const ml_case_step_t s_referral_steps[] = {
    /* The broker records delivery when the target's agent acks the referral. */
    {R_(SENT), R_(DELIVERED), M_BROKER, B_DELIVERY},
    {R_(REDIRECTED), R_(DELIVERED), M_BROKER, B_DELIVERY},

    /* The target decides; the ack may still be in flight, hence from SENT.
     * When nobody decides in time, the broker hands the referral on. */
    {R_(SENT), R_(ACCEPTED), M_TARGET, NULL},
    {R_(SENT), R_(REJECTED), M_TARGET, NULL},
    {R_(SENT), R_(REDIRECTED), M_TARGET | M_BROKER, B_FALLBACK},
    {R_(DELIVERED), R_(ACCEPTED), M_TARGET, NULL},
    {R_(DELIVERED), R_(REJECTED), M_TARGET, NULL},
    {R_(DELIVERED), R_(REDIRECTED), M_TARGET | M_BROKER, B_FALLBACK},
    {R_(REDIRECTED), R_(ACCEPTED), M_TARGET, NULL},
    {R_(REDIRECTED), R_(REJECTED), M_TARGET, NULL},
    {R_(REDIRECTED), R_(REDIRECTED), M_TARGET | M_BROKER, B_FALLBACK},

    /* Schedule, reschedule, and reschedule after a missed appointment. */
    {R_(ACCEPTED), R_(SCHEDULED), M_TARGET, NULL},
    {R_(SCHEDULED), R_(SCHEDULED), M_TARGET, NULL},
    {R_(NO_SHOW), R_(SCHEDULED), M_TARGET, NULL},

    {R_(SCHEDULED), R_(ARRIVED), M_TARGET, NULL},
    {R_(SCHEDULED), R_(NO_SHOW), M_TARGET, NULL},
    {R_(ARRIVED), R_(ADMITTED), M_TARGET, NULL},
    {R_(ADMITTED), R_(DISCHARGED), M_TARGET, NULL},

    /* Either end may close the loop once the patient has been seen, or has
     * not come. */
    {R_(DISCHARGED), R_(CLOSED), M_TARGET | M_OPENER, NULL},
    {R_(ARRIVED), R_(CLOSED), M_TARGET | M_OPENER, NULL},
    {R_(NO_SHOW), R_(CLOSED), M_TARGET | M_OPENER, NULL},

    /* The referrer may withdraw until the patient is at the hospital. */
    {R_(SENT), R_(CANCELLED), M_OPENER, NULL},
    {R_(DELIVERED), R_(CANCELLED), M_OPENER, NULL},
    {R_(REDIRECTED), R_(CANCELLED), M_OPENER, NULL},
    {R_(ACCEPTED), R_(CANCELLED), M_OPENER, NULL},
    {R_(SCHEDULED), R_(CANCELLED), M_OPENER, NULL},
};

/* Progress order. States a case reaches by the same kind of step share a
 * rank (a redirect is another delivery, a no-show another outcome of the
 * appointment); the final states rank last, as a case in one of them has
 * gone as far as it ever will. */
static const int s_referral_rank[R_COUNT] = {
    [R_(SENT)] = 1,       [R_(DELIVERED)] = 2, [R_(REDIRECTED)] = 2, [R_(ACCEPTED)] = 3,
    [R_(SCHEDULED)] = 4,  [R_(ARRIVED)] = 5,   [R_(NO_SHOW)] = 5,    [R_(ADMITTED)] = 6,
    [R_(DISCHARGED)] = 7, [R_(CLOSED)] = 8,    [R_(REJECTED)] = 8,   [R_(CANCELLED)] = 8,
};

/* FHIR R4 Task.status per state; docs/workflows.md gives the reasons. */
static const char *const s_referral_fhir[R_COUNT] = {
    [R_(SENT)] = "requested",       [R_(DELIVERED)] = "received",  [R_(ACCEPTED)] = "accepted",
    [R_(REJECTED)] = "rejected",    [R_(REDIRECTED)] = "received", [R_(SCHEDULED)] = "ready",
    [R_(ARRIVED)] = "in-progress",  [R_(NO_SHOW)] = "on-hold",     [R_(ADMITTED)] = "in-progress",
    [R_(DISCHARGED)] = "completed", [R_(CLOSED)] = "completed",    [R_(CANCELLED)] = "cancelled",
};

/* ---- imaging consult --------------------------------------------------- */

static const ml_case_step_t s_imaging_steps[] = {
    /* A reading centre's agent acked the consult: the study has a reader. */
    {I_(REQUESTED), I_(ASSIGNED), M_BROKER, B_DELIVERY},

    /* Every object arrived and matched its SHA-256. The chunks may all be
     * in before the broker has seen the ack, hence from REQUESTED. */
    {I_(REQUESTED), I_(STUDY_RECEIVED), M_TARGET, NULL},
    {I_(ASSIGNED), I_(STUDY_RECEIVED), M_TARGET, NULL},

    /* The signed report; a second one amends the first. */
    {I_(STUDY_RECEIVED), I_(REPORTED), M_TARGET, NULL},
    {I_(REPORTED), I_(REPORTED), M_TARGET, NULL},

    {I_(REPORTED), I_(CLOSED), M_TARGET | M_OPENER, NULL},

    /* Until there is a report, the centre may decline to read and the
     * clinic may withdraw. */
    {I_(REQUESTED), I_(REJECTED), M_TARGET, NULL},
    {I_(ASSIGNED), I_(REJECTED), M_TARGET, NULL},
    {I_(STUDY_RECEIVED), I_(REJECTED), M_TARGET, NULL},
    {I_(REQUESTED), I_(CANCELLED), M_OPENER, NULL},
    {I_(ASSIGNED), I_(CANCELLED), M_OPENER, NULL},
    {I_(STUDY_RECEIVED), I_(CANCELLED), M_OPENER, NULL},
};

static const int s_imaging_rank[I_COUNT] = {
    [I_(REQUESTED)] = 1, [I_(ASSIGNED)] = 2, [I_(STUDY_RECEIVED)] = 3, [I_(REPORTED)] = 4,
    [I_(CLOSED)] = 5,    [I_(REJECTED)] = 5, [I_(CANCELLED)] = 5,
};

static const char *const s_imaging_fhir[I_COUNT] = {
    [I_(REQUESTED)] = "requested",        [I_(ASSIGNED)] = "received",
    [I_(STUDY_RECEIVED)] = "in-progress", [I_(REPORTED)] = "completed",
    [I_(REJECTED)] = "rejected",          [I_(CANCELLED)] = "cancelled",
    [I_(CLOSED)] = "completed",
};

/* ---- rehab down-transfer ----------------------------------------------- */

static const ml_case_step_t s_down_steps[] = {
    /* The receiving clinic's family-doctor team decides. */
    {D_(OFFERED), D_(ACCEPTED), M_TARGET, NULL},
    {D_(OFFERED), D_(DECLINED), M_TARGET, NULL},

    /* The hospital may withdraw until the patient is at the clinic. */
    {D_(OFFERED), D_(CANCELLED), M_OPENER, NULL},
    {D_(ACCEPTED), D_(CANCELLED), M_OPENER, NULL},

    {D_(ACCEPTED), D_(ARRIVED), M_TARGET, NULL},

    /* Follow-ups, numbered 1, 2, ... (the number is ml_env_validate's). */
    {D_(ARRIVED), D_(FOLLOW_UP), M_TARGET, NULL},
    {D_(FOLLOW_UP), D_(FOLLOW_UP), M_TARGET, NULL},
    {D_(ARRIVED), D_(COMPLETED), M_TARGET, NULL},
    {D_(FOLLOW_UP), D_(COMPLETED), M_TARGET, NULL},

    /* The patient got worse and went back up: a Referral whose
     * linked_case_id names this case. Nobody sends this state. */
    {D_(ARRIVED), D_(RE_REFERRED), M_BROKER, B_LINKED},
    {D_(FOLLOW_UP), D_(RE_REFERRED), M_BROKER, B_LINKED},
};

static const int s_down_rank[D_COUNT] = {
    [D_(OFFERED)] = 1,   [D_(ACCEPTED)] = 2, [D_(ARRIVED)] = 3,     [D_(FOLLOW_UP)] = 4,
    [D_(COMPLETED)] = 5, [D_(DECLINED)] = 5, [D_(RE_REFERRED)] = 5, [D_(CANCELLED)] = 5,
};

static const char *const s_down_fhir[D_COUNT] = {
    [D_(OFFERED)] = "requested",   [D_(ACCEPTED)] = "accepted",     [D_(DECLINED)] = "rejected",
    [D_(ARRIVED)] = "in-progress", [D_(FOLLOW_UP)] = "in-progress", [D_(COMPLETED)] = "completed",
    [D_(RE_REFERRED)] = "failed",  [D_(CANCELLED)] = "cancelled",
};

/* ---- every kind -------------------------------------------------------- */

#define S_N(a) (sizeof(a) / sizeof((a)[0]))

static const ml_case_life_t s_lives[ML_CASE_KIND_COUNT] = {
    [ML_CASE_REFERRAL] =
        {
            .name = "referral",
            .words = "a referral",
            .kind_enum = "CASE_REFERRAL",
            .enumd = &medlink__v1__referral_status__descriptor,
            .prefix = "REFERRAL_",
            .initial = R_(SENT),
            .count = R_COUNT,
            .steps = s_referral_steps,
            .n_steps = S_N(s_referral_steps),
            .rank = s_referral_rank,
            .fhir = s_referral_fhir,
            .opener_words = "the referring clinic",
            .target_words = "the receiving hospital",
        },
    [ML_CASE_IMAGING] =
        {
            .name = "imaging",
            .words = "an imaging consult",
            .kind_enum = "CASE_IMAGING",
            .enumd = &medlink__v1__imaging_status__descriptor,
            .prefix = "IMAGING_",
            .initial = I_(REQUESTED),
            .count = I_COUNT,
            .steps = s_imaging_steps,
            .n_steps = S_N(s_imaging_steps),
            .rank = s_imaging_rank,
            .fhir = s_imaging_fhir,
            .opener_words = "the requesting clinic",
            .target_words = "the reading centre",
        },
    [ML_CASE_DOWN_TRANSFER] =
        {
            .name = "down_transfer",
            .words = "a down-transfer",
            .kind_enum = "CASE_DOWN_TRANSFER",
            .enumd = &medlink__v1__down_transfer_status__descriptor,
            .prefix = "DOWN_TRANSFER_",
            .initial = D_(OFFERED),
            .count = D_COUNT,
            .steps = s_down_steps,
            .n_steps = S_N(s_down_steps),
            .rank = s_down_rank,
            .fhir = s_down_fhir,
            .opener_words = "the discharging hospital",
            .target_words = "the receiving clinic",
        },
};

/* Messages that travel in a case without moving it: who may send them, and
 * in which states (a mask of 1 << state). */
static const struct {
    int case_kind;
    int msg_kind;
    unsigned parties;
    unsigned states;
} s_messages[] = {
    /* The study's bytes flow until the reading centre has all of them. */
    {ML_CASE_IMAGING, K_(IMAGING_CHUNK), M_OPENER, (1u << I_(REQUESTED)) | (1u << I_(ASSIGNED))},
    {ML_CASE_IMAGING, K_(IMAGING_RESEND), M_TARGET, (1u << I_(REQUESTED)) | (1u << I_(ASSIGNED))},
};

/* The sentence for a node that is neither end of the case. It is the same
 * for every kind and every state: the node must not learn the case's state
 * (a patient's progress through a hospital), nor even its kind. */
#define S_NOT_PARTY                                                                                \
    "node has no part in this case (only the node that opened it, the node now responsible for "   \
    "it and the broker may change it)"

static const ml_case_life_t *s_life(int case_kind)
{
    if (case_kind <= ML_CASE_NONE || case_kind >= ML_CASE_KIND_COUNT)
        return NULL;
    return &s_lives[case_kind];
}

/* 1 for the states a case of this kind can actually be in (not
 * UNSPECIFIED, not values outside the enum). */
static int s_is_state(const ml_case_life_t *l, int state)
{
    return state > 0 && state < l->count;
}

/* 1 for the parties of a case; party values outside the enum are treated as
 * outsiders, which is the safe reading of a caller's bug. */
static int s_is_party(int party)
{
    return party == ML_PARTY_BROKER || party == ML_PARTY_OPENER || party == ML_PARTY_TARGET;
}

/* O(rows); the longest table has 27 rows and is read once per update. */
static const ml_case_step_t *s_find(const ml_case_life_t *l, int from, int to)
{
    for (size_t i = 0; i < l->n_steps; i++)
        if (l->steps[i].from == from && l->steps[i].to == to)
            return &l->steps[i];
    return NULL;
}

/* Appends s to buf (of len, used so far *used), truncating quietly. */
static void s_append(char *buf, size_t len, size_t *used, const char *s)
{
    if (*used >= len)
        return;
    int n = snprintf(buf + *used, len - *used, "%s", s);
    if (n < 0)
        return;
    *used += (size_t)n < len - *used ? (size_t)n : len - *used - 1;
}

/* Writes "the receiving hospital or the referring clinic" etc. for a mask;
 * broker is how the broker is named (the reason it makes the step). */
static void s_parties(const ml_case_life_t *l, unsigned mask, const char *broker, char *buf,
                      size_t len)
{
    const char *words[] = {l->target_words, l->opener_words, broker ? broker : "the broker"};
    const unsigned bits[] = {M_TARGET, M_OPENER, M_BROKER};
    size_t used = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < S_N(bits); i++) {
        if (!(mask & bits[i]))
            continue;
        if (used)
            s_append(buf, len, &used, " or ");
        s_append(buf, len, &used, words[i]);
    }
}

/* A state in words, for the sentences below: its enum name, or its number
 * when it is not a value of the kind's enum at all. */
static const char *s_label(const ml_case_life_t *l, int state, char *buf, size_t len)
{
    const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(l->enumd, state);
    if (v)
        return v->name;
    snprintf(buf, len, "unknown state %d", state);
    return buf;
}

/* A message kind in words: its Kind name without "KIND_", or its number. */
static const char *s_msg_label(int msg_kind, char *buf, size_t len)
{
    const ProtobufCEnumValue *v =
        protobuf_c_enum_descriptor_get_value(&medlink__v1__kind__descriptor, msg_kind);
    if (v && msg_kind != K_(UNSPECIFIED))
        return strncmp(v->name, "KIND_", 5) == 0 ? v->name + 5 : v->name;
    snprintf(buf, len, "message kind %d", msg_kind);
    return buf;
}

/* 1 if some row leaves state. */
static int s_has_exit(const ml_case_life_t *l, int state)
{
    for (size_t i = 0; i < l->n_steps; i++)
        if (l->steps[i].from == state)
            return 1;
    return 0;
}

const char *ml_case_kind_name(int case_kind)
{
    const ml_case_life_t *l = s_life(case_kind);
    return l ? l->name : "";
}

/* Compares case-insensitively, with '-' and '_' taken as the same. */
static int s_kind_word_eq(const char *a, const char *b)
{
    for (;; a++, b++) {
        char ca = *a == '-' ? '_' : *a;
        char cb = *b == '-' ? '_' : *b;
        if (ca >= 'A' && ca <= 'Z')
            ca = (char)(ca - 'A' + 'a');
        if (cb >= 'A' && cb <= 'Z')
            cb = (char)(cb - 'A' + 'a');
        if (ca != cb)
            return 0;
        if (!ca)
            return 1;
    }
}

int ml_case_kind_parse(const char *s, int *case_kind)
{
    if (!s)
        return ML_EINVAL;
    for (int k = ML_CASE_NONE + 1; k < ML_CASE_KIND_COUNT; k++) {
        if (s_kind_word_eq(s, s_lives[k].name) || s_kind_word_eq(s, s_lives[k].kind_enum)) {
            *case_kind = k;
            return 0;
        }
    }
    return ML_EINVAL;
}

int ml_case_kind_of_message(int msg_kind)
{
    switch (msg_kind) {
    case K_(REFERRAL):
    case K_(REFERRAL_UPDATE):
        return ML_CASE_REFERRAL;
    case K_(IMAGING_CONSULT):
    case K_(IMAGING_CHUNK):
    case K_(IMAGING_RESEND):
    case K_(IMAGING_UPDATE):
    case K_(IMAGING_REPORT):
        return ML_CASE_IMAGING;
    case K_(DOWN_TRANSFER):
    case K_(DOWN_TRANSFER_UPDATE):
        return ML_CASE_DOWN_TRANSFER;
    default:
        /* Control kinds, and ESCALATION, which is about a case but is the
         * broker's own report on it, not a step of it. */
        return ML_CASE_NONE;
    }
}

int ml_case_opens(int msg_kind)
{
    return msg_kind == K_(REFERRAL) || msg_kind == K_(IMAGING_CONSULT) ||
           msg_kind == K_(DOWN_TRANSFER);
}

int ml_case_initial_state(int case_kind)
{
    const ml_case_life_t *l = s_life(case_kind);
    return l ? l->initial : 0;
}

int ml_case_check(int case_kind, int from, int to, int party, char *err, size_t errlen)
{
    /* First, before anything about the case: an outsider learns nothing. */
    if (!s_is_party(party)) {
        ml_seterr(err, errlen, S_NOT_PARTY);
        return ML_EDENIED;
    }
    const ml_case_life_t *l = s_life(case_kind);
    if (!l) {
        ml_seterr(err, errlen, "illegal transition: %d is not a kind of case", case_kind);
        return ML_EDENIED;
    }

    char tobuf[32], frombuf[32];
    const char *to_name = s_label(l, to, tobuf, sizeof tobuf);
    const char *from_name = s_label(l, from, frombuf, sizeof frombuf);

    /* A stored case is never in these; if it is, the caller's record is
     * broken, and the sentence says so rather than blaming the request. */
    if (!s_is_state(l, from)) {
        ml_seterr(err, errlen,
                  "illegal transition: case is %s, which is not a state a case can be in; %s "
                  "is not allowed from it",
                  from_name, to_name);
        return ML_EDENIED;
    }
    if (!s_has_exit(l, from)) {
        ml_seterr(err, errlen,
                  "illegal transition: case is %s, which is final; %s is not allowed from it",
                  from_name, to_name);
        return ML_EDENIED;
    }
    if (to == l->initial) {
        ml_seterr(err, errlen,
                  "illegal transition: case is %s, %s is only the state a case is opened in",
                  from_name, to_name);
        return ML_EDENIED;
    }
    if (!s_is_state(l, to)) {
        ml_seterr(err, errlen,
                  "illegal transition: case is %s, %s is not a state a case can be set to",
                  from_name, to_name);
        return ML_EDENIED;
    }

    const ml_case_step_t *step = s_find(l, from, to);
    if (!step) {
        ml_seterr(err, errlen, "illegal transition: case is %s, %s is not allowed from it",
                  from_name, to_name);
        return ML_EDENIED;
    }
    if (!(step->parties & (1u << party))) {
        char who[128];
        s_parties(l, step->parties, step->broker, who, sizeof who);
        ml_seterr(err, errlen, "%s may only be set by %s (case is %s)", to_name, who, from_name);
        return ML_EDENIED;
    }
    return 0;
}

int ml_case_check_message(int case_kind, int state, int msg_kind, int party, char *err,
                          size_t errlen)
{
    if (!s_is_party(party)) {
        ml_seterr(err, errlen, S_NOT_PARTY);
        return ML_EDENIED;
    }
    char msgbuf[32];
    const char *msg_name = s_msg_label(msg_kind, msgbuf, sizeof msgbuf);
    const ml_case_life_t *l = s_life(case_kind);
    if (!l) {
        ml_seterr(err, errlen, "illegal message: %d is not a kind of case", case_kind);
        return ML_EDENIED;
    }

    size_t m = 0;
    while (m < S_N(s_messages) &&
           !(s_messages[m].case_kind == case_kind && s_messages[m].msg_kind == msg_kind))
        m++;
    if (m == S_N(s_messages)) {
        /* Not a mistake in the case's state but in what is being asked: a
         * message that moves a case goes through ml_case_check, and one of
         * another kind of case does not belong here at all. */
        if (ml_case_kind_of_message(msg_kind) != case_kind)
            ml_seterr(err, errlen, "illegal message: %s does not belong to %s", msg_name, l->words);
        else
            ml_seterr(err, errlen,
                      "illegal message: %s changes a case's state and is checked as a transition",
                      msg_name);
        return ML_EDENIED;
    }

    char statebuf[32];
    const char *state_name = s_label(l, state, statebuf, sizeof statebuf);
    if (!s_is_state(l, state)) {
        ml_seterr(err, errlen,
                  "illegal message: case is %s, which is not a state a case can be in; %s is "
                  "not accepted in it",
                  state_name, msg_name);
        return ML_EDENIED;
    }
    if (!(s_messages[m].states & (1u << state))) {
        /* "IMAGING_REQUESTED or IMAGING_ASSIGNED", from the mask. */
        char allowed[160] = "", buf[32];
        size_t used = 0;
        int listed = 0, total = 0;
        for (int s = 1; s < l->count; s++)
            total += (int)((s_messages[m].states >> s) & 1u);
        for (int s = 1; s < l->count; s++) {
            if (!(s_messages[m].states & (1u << s)))
                continue;
            if (listed)
                s_append(allowed, sizeof allowed, &used, listed + 1 == total ? " or " : ", ");
            s_append(allowed, sizeof allowed, &used, s_label(l, s, buf, sizeof buf));
            listed++;
        }
        ml_seterr(err, errlen, "illegal message: case is %s, %s is only accepted while it is %s",
                  state_name, msg_name, allowed);
        return ML_EDENIED;
    }
    if (!(s_messages[m].parties & (1u << party))) {
        char who[128];
        s_parties(l, s_messages[m].parties, NULL, who, sizeof who);
        ml_seterr(err, errlen, "%s may only be sent by %s (case is %s)", msg_name, who, state_name);
        return ML_EDENIED;
    }
    return 0;
}

/* What some states need said with them: an appointment has a time, a
 * discharge an outcome summary (the referring clinic's follow-up rests on
 * it). One row per (kind, state); the field names are the proto's. */
static const struct {
    int case_kind;
    int state;
    const char *field;
} s_required[] = {
    {ML_CASE_REFERRAL, R_(SCHEDULED), "referral_update.scheduled_at"},
    {ML_CASE_REFERRAL, R_(DISCHARGED), "referral_update.outcome_summary"},
};

const char *ml_case_required_field(int case_kind, int to)
{
    for (size_t i = 0; i < S_N(s_required); i++)
        if (s_required[i].case_kind == case_kind && s_required[i].state == to)
            return s_required[i].field;
    return NULL;
}

int ml_case_terminal(int case_kind, int state)
{
    /* Terminal is defined by the table: a state no row leaves. */
    const ml_case_life_t *l = s_life(case_kind);
    return l && s_is_state(l, state) && !s_has_exit(l, state);
}

int ml_case_rank(int case_kind, int state)
{
    const ml_case_life_t *l = s_life(case_kind);
    if (!l || !s_is_state(l, state))
        return 0;
    return l->rank[state];
}

const char *ml_case_state_name(int case_kind, int state)
{
    /* Names come from the generated descriptor so they cannot drift from the
     * proto; protobuf-c's lookup is a binary search over the values. */
    const ml_case_life_t *l = s_life(case_kind);
    if (!l)
        return "UNKNOWN";
    const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(l->enumd, state);
    return v ? v->name : "UNKNOWN";
}

int ml_case_state_parse(int case_kind, const char *s, int *state)
{
    const ml_case_life_t *l = s_life(case_kind);
    if (!l || !s)
        return ML_EINVAL;
    size_t plen = strlen(l->prefix);
    for (unsigned i = 0; i < l->enumd->n_values; i++) {
        const ProtobufCEnumValue *v = &l->enumd->values[i];
        /* UNSPECIFIED is in the enum but no case is ever in it. */
        if (!s_is_state(l, v->value))
            continue;
        if (strcasecmp(s, v->name) == 0 ||
            (strncmp(v->name, l->prefix, plen) == 0 && strcasecmp(s, v->name + plen) == 0)) {
            *state = v->value;
            return 0;
        }
    }
    return ML_EINVAL;
}

const char *ml_case_fhir_status(int case_kind, int state)
{
    /* UNSPECIFIED and values outside the enum have no Task.status; "" lets a
     * caller test *s without a NULL check and never emits a wrong code. */
    const ml_case_life_t *l = s_life(case_kind);
    if (!l || !s_is_state(l, state))
        return "";
    return l->fhir[state];
}

/* ---- upward referral (kept for existing callers) ---------------------- */

int ml_case_referral_check(int from, int to, int party, char *err, size_t errlen)
{
    return ml_case_check(ML_CASE_REFERRAL, from, to, party, err, errlen);
}

int ml_case_referral_terminal(int state)
{
    return ml_case_terminal(ML_CASE_REFERRAL, state);
}

const char *ml_case_referral_state_name(int state)
{
    return ml_case_state_name(ML_CASE_REFERRAL, state);
}

const char *ml_case_referral_fhir_status(int state)
{
    return ml_case_fhir_status(ML_CASE_REFERRAL, state);
}
