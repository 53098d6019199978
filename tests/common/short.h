/* Shorthands for the generated protobuf-c enum names, shared by the unit
 * and integration tests (and the tools under tests/): K_(REFERRAL) for
 * MEDLINK__V1__KIND__KIND_REFERRAL, NACK_(INVALID) for
 * MEDLINK__V1__NACK_CODE__NACK_INVALID, and so on. One spelling for every
 * test, so that a renamed enum is fixed here once. Include it after the
 * generated headers (ml_env.h). */
#ifndef ML_TEST_SHORT_H
#define ML_TEST_SHORT_H

#define K_(x) MEDLINK__V1__KIND__KIND_##x
#define P_(x) MEDLINK__V1__ENVELOPE__PAYLOAD_##x
#define NACK_(x) MEDLINK__V1__NACK_CODE__NACK_##x
#define PRIO_(x) MEDLINK__V1__PRIORITY__PRIORITY_##x
#define REF_(x) MEDLINK__V1__REFERRAL_STATUS__REFERRAL_##x
#define IMG_(x) MEDLINK__V1__IMAGING_STATUS__IMAGING_##x
#define DT_(x) MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_##x
#define OP_(x) MEDLINK__V1__ADMIN_REQUEST__OP__OP_##x
#define ESC_(x) MEDLINK__V1__ESCALATION_REASON__ESCALATION_##x

#endif
