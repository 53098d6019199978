/* Case lifecycles: the upward-referral transition table of cases.h as data,
 * the checks over it, and the state names and FHIR Task.status mapping. The
 * table is the one statement of the lifecycle in code; the comment in
 * cases.h and docs/workflows.md describe it, and tests/unit/test_cases.c
 * states it again independently and compares the two. */
#include "cases.h"

#include "ml_common.h"
#include "medlink/v1/referral.pb-c.h"

#include <stdio.h>

/* Short names so that the table below reads like the one in cases.h. */
#define S_(x) MEDLINK__V1__REFERRAL_STATUS__REFERRAL_##x

#define M_BROKER (1u << ML_PARTY_BROKER)
#define M_REFERRER (1u << ML_PARTY_REFERRER)
#define M_TARGET (1u << ML_PARTY_TARGET)

/* One past the highest ReferralStatus value; test_cases.c checks it against
 * the enum descriptor, so a state added to the proto fails the tests until
 * this file has decided what the new state may follow and lead to. */
#define S_COUNT (S_(CANCELLED) + 1)

typedef struct {
    int from;
    int to;
    unsigned parties; /* M_* bits of the parties that may make this step */
} ml_case_step_t;

/* Every legal step, one row per (from, to) pair. Who may make a step depends
 * only on the state it leads to, but keeping the mask per row lets a future
 * step break that rule without changing the code. */
static const ml_case_step_t s_steps[] = {
    /* The broker records delivery when the target's agent acks the referral. */
    {S_(SENT), S_(DELIVERED), M_BROKER},
    {S_(REDIRECTED), S_(DELIVERED), M_BROKER},

    /* The target decides; the ack may still be in flight, hence from SENT. */
    {S_(SENT), S_(ACCEPTED), M_TARGET},
    {S_(SENT), S_(REJECTED), M_TARGET},
    {S_(SENT), S_(REDIRECTED), M_TARGET},
    {S_(DELIVERED), S_(ACCEPTED), M_TARGET},
    {S_(DELIVERED), S_(REJECTED), M_TARGET},
    {S_(DELIVERED), S_(REDIRECTED), M_TARGET},
    {S_(REDIRECTED), S_(ACCEPTED), M_TARGET},
    {S_(REDIRECTED), S_(REJECTED), M_TARGET},
    {S_(REDIRECTED), S_(REDIRECTED), M_TARGET},

    /* Schedule, reschedule, and reschedule after a missed appointment. */
    {S_(ACCEPTED), S_(SCHEDULED), M_TARGET},
    {S_(SCHEDULED), S_(SCHEDULED), M_TARGET},
    {S_(NO_SHOW), S_(SCHEDULED), M_TARGET},

    {S_(SCHEDULED), S_(ARRIVED), M_TARGET},
    {S_(SCHEDULED), S_(NO_SHOW), M_TARGET},
    {S_(ARRIVED), S_(ADMITTED), M_TARGET},
    {S_(ADMITTED), S_(DISCHARGED), M_TARGET},

    /* Either end may close the loop once the patient has been seen, or has
     * not come. */
    {S_(DISCHARGED), S_(CLOSED), M_TARGET | M_REFERRER},
    {S_(ARRIVED), S_(CLOSED), M_TARGET | M_REFERRER},
    {S_(NO_SHOW), S_(CLOSED), M_TARGET | M_REFERRER},

    /* The referrer may withdraw until the patient is at the hospital. */
    {S_(SENT), S_(CANCELLED), M_REFERRER},
    {S_(DELIVERED), S_(CANCELLED), M_REFERRER},
    {S_(REDIRECTED), S_(CANCELLED), M_REFERRER},
    {S_(ACCEPTED), S_(CANCELLED), M_REFERRER},
    {S_(SCHEDULED), S_(CANCELLED), M_REFERRER},
};

/* FHIR R4 Task.status per state; docs/workflows.md gives the reasons. */
static const char *const s_fhir[S_COUNT] = {
    [S_(SENT)] = "requested",       [S_(DELIVERED)] = "received",  [S_(ACCEPTED)] = "accepted",
    [S_(REJECTED)] = "rejected",    [S_(REDIRECTED)] = "received", [S_(SCHEDULED)] = "ready",
    [S_(ARRIVED)] = "in-progress",  [S_(NO_SHOW)] = "on-hold",     [S_(ADMITTED)] = "in-progress",
    [S_(DISCHARGED)] = "completed", [S_(CLOSED)] = "completed",    [S_(CANCELLED)] = "cancelled",
};

/* 1 for the states a case can actually be in (not UNSPECIFIED, not values
 * outside the enum). */
static int s_is_state(int state)
{
    return state > S_(STATUS_UNSPECIFIED) && state < S_COUNT;
}

/* O(rows); the table has 27 rows and is checked once per update. */
static const ml_case_step_t *s_find(int from, int to)
{
    for (size_t i = 0; i < sizeof s_steps / sizeof s_steps[0]; i++)
        if (s_steps[i].from == from && s_steps[i].to == to)
            return &s_steps[i];
    return NULL;
}

/* Writes "the receiving hospital or the referring clinic" etc. for a mask. */
static void s_parties(unsigned mask, char *buf, size_t len)
{
    static const struct {
        unsigned bit;
        const char *who;
    } names[] = {
        {M_TARGET, "the receiving hospital"},
        {M_REFERRER, "the referring clinic"},
        {M_BROKER, "the broker (on delivery)"},
    };
    size_t used = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (!(mask & names[i].bit))
            continue;
        int n = snprintf(buf + used, len - used, "%s%s", used ? " or " : "", names[i].who);
        if (n < 0 || (size_t)n >= len - used)
            return;
        used += (size_t)n;
    }
}

/* The attempted state in words, for the sentences below: its name, or its
 * number when it is not a ReferralStatus value at all. */
static const char *s_label(int state, char *buf, size_t len)
{
    if (state >= 0 && state < S_COUNT)
        return ml_case_referral_state_name(state);
    snprintf(buf, len, "unknown state %d", state);
    return buf;
}

int ml_case_referral_check(int from, int to, int party, char *err, size_t errlen)
{
    char tobuf[32], frombuf[32];
    const char *to_name = s_label(to, tobuf, sizeof tobuf);
    const char *from_name = s_label(from, frombuf, sizeof frombuf);

    /* First, before anything about the case: a node that is neither end of
     * it must not learn the case's state from our refusal (it is a patient's
     * progress through a hospital). Party values outside the enum are
     * treated the same way, which is the safe reading of a caller's bug. */
    if (party != ML_PARTY_BROKER && party != ML_PARTY_REFERRER && party != ML_PARTY_TARGET) {
        ml_seterr(err, errlen,
                  "node has no part in this case (only the referring clinic, the receiving "
                  "hospital and the broker may change it)");
        return ML_EDENIED;
    }

    /* A stored case is never in these; if it is, the caller's record is
     * broken, and the sentence says so rather than blaming the request. */
    if (!s_is_state(from)) {
        ml_seterr(err, errlen,
                  "illegal transition: case is %s, which is not a state a case can be in; %s "
                  "is not allowed from it",
                  from_name, to_name);
        return ML_EDENIED;
    }
    if (ml_case_referral_terminal(from)) {
        ml_seterr(err, errlen,
                  "illegal transition: case is %s, which is final; %s is not allowed from it",
                  from_name, to_name);
        return ML_EDENIED;
    }
    if (to == S_(SENT)) {
        ml_seterr(err, errlen,
                  "illegal transition: case is %s, %s is only the state a case is opened in",
                  from_name, to_name);
        return ML_EDENIED;
    }
    if (!s_is_state(to)) {
        ml_seterr(err, errlen,
                  "illegal transition: case is %s, %s is not a state a case can be set to",
                  from_name, to_name);
        return ML_EDENIED;
    }

    const ml_case_step_t *step = s_find(from, to);
    if (!step) {
        ml_seterr(err, errlen, "illegal transition: case is %s, %s is not allowed from it",
                  from_name, to_name);
        return ML_EDENIED;
    }
    if (!(step->parties & (1u << party))) {
        char who[96];
        s_parties(step->parties, who, sizeof who);
        ml_seterr(err, errlen, "%s may only be set by %s (case is %s)", to_name, who, from_name);
        return ML_EDENIED;
    }
    return 0;
}

int ml_case_referral_terminal(int state)
{
    return state == S_(REJECTED) || state == S_(CANCELLED) || state == S_(CLOSED);
}

const char *ml_case_referral_state_name(int state)
{
    /* Names come from the generated descriptor so they cannot drift from the
     * proto; protobuf-c's lookup is a binary search over 13 values. */
    const ProtobufCEnumValue *v =
        protobuf_c_enum_descriptor_get_value(&medlink__v1__referral_status__descriptor, state);
    return v ? v->name : "UNKNOWN";
}

const char *ml_case_referral_fhir_status(int state)
{
    /* UNSPECIFIED and values outside the enum have no Task.status; "" lets a
     * caller test *s without a NULL check and never emits a wrong code. */
    if (!s_is_state(state))
        return "";
    return s_fhir[state];
}
