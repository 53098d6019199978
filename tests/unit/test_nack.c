/* Unit tests for ml_nack: every NackCode of control.proto has its protocol
 * name, the transient set is exactly the documented four, and codes the
 * build does not know are named "NACK_UNKNOWN" and never transient. The
 * table below is written out by hand on purpose: a code added to the
 * protocol makes the count test fail until someone decides here whether a
 * sender should retry it. */
#include <string.h>

#include <criterion/criterion.h>

#include "medlink/v1/control.pb-c.h"
#include "ml_nack.h"

static const struct {
    int code;
    const char *name;
    int transient;
} s_codes[] = {
    {MEDLINK__V1__NACK_CODE__NACK_UNSPECIFIED, "NACK_UNSPECIFIED", 0},
    {MEDLINK__V1__NACK_CODE__NACK_MALFORMED, "NACK_MALFORMED", 0},
    {MEDLINK__V1__NACK_CODE__NACK_IDENTITY, "NACK_IDENTITY", 0},
    {MEDLINK__V1__NACK_CODE__NACK_UNKNOWN_NODE, "NACK_UNKNOWN_NODE", 0},
    {MEDLINK__V1__NACK_CODE__NACK_FORBIDDEN, "NACK_FORBIDDEN", 0},
    {MEDLINK__V1__NACK_CODE__NACK_TOO_LARGE, "NACK_TOO_LARGE", 0},
    {MEDLINK__V1__NACK_CODE__NACK_STORE, "NACK_STORE", 1},
    {MEDLINK__V1__NACK_CODE__NACK_STORE_FULL, "NACK_STORE_FULL", 1},
    {MEDLINK__V1__NACK_CODE__NACK_NOT_HELLO, "NACK_NOT_HELLO", 0},
    {MEDLINK__V1__NACK_CODE__NACK_INVALID, "NACK_INVALID", 0},
    {MEDLINK__V1__NACK_CODE__NACK_RATE_LIMITED, "NACK_RATE_LIMITED", 1},
    {MEDLINK__V1__NACK_CODE__NACK_ILLEGAL_TRANSITION, "NACK_ILLEGAL_TRANSITION", 0},
    {MEDLINK__V1__NACK_CODE__NACK_NOT_PARTY, "NACK_NOT_PARTY", 0},
    {MEDLINK__V1__NACK_CODE__NACK_UNKNOWN_CASE, "NACK_UNKNOWN_CASE", 0},
    {MEDLINK__V1__NACK_CODE__NACK_CONFLICT, "NACK_CONFLICT", 1},
    {MEDLINK__V1__NACK_CODE__NACK_REFUSED, "NACK_REFUSED", 0},
    {MEDLINK__V1__NACK_CODE__NACK_ID_IN_USE, "NACK_ID_IN_USE", 0},
};
#define S_N (sizeof s_codes / sizeof s_codes[0])

Test(nack, table_covers_every_protocol_code)
{
    const ProtobufCEnumDescriptor *d = &medlink__v1__nack_code__descriptor;
    cr_assert_eq(d->n_values, S_N, "control.proto has %u NackCodes, this test knows %zu",
                 d->n_values, S_N);
    for (unsigned i = 0; i < d->n_values; i++) {
        int found = 0;
        for (size_t k = 0; k < S_N; k++)
            found |= s_codes[k].code == d->values[i].value;
        cr_expect(found, "%s is not in the test's table", d->values[i].name);
    }
}

Test(nack, every_code_has_its_enum_name)
{
    for (size_t k = 0; k < S_N; k++) {
        const char *n = ml_nack_name(s_codes[k].code);
        cr_assert_not_null(n);
        cr_expect_str_eq(n, s_codes[k].name, "code %d", s_codes[k].code);
        /* A static string: the same pointer every time. */
        cr_expect_eq(ml_nack_name(s_codes[k].code), n);
    }
}

Test(nack, transient_set_is_exactly_store_full_rate_conflict)
{
    int n_transient = 0;
    for (size_t k = 0; k < S_N; k++) {
        cr_expect_eq(ml_nack_is_transient(s_codes[k].code), s_codes[k].transient, "%s",
                     s_codes[k].name);
        n_transient += ml_nack_is_transient(s_codes[k].code);
    }
    cr_expect_eq(n_transient, 4);
}

Test(nack, unknown_codes_have_a_stable_name_and_are_permanent)
{
    const int unknown[] = {-1, 17, 18, 99, 1000, -2147483647 - 1, 2147483647};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        cr_expect_str_eq(ml_nack_name(unknown[i]), "NACK_UNKNOWN", "code %d", unknown[i]);
        cr_expect_eq(ml_nack_is_transient(unknown[i]), 0, "code %d", unknown[i]);
    }
}
