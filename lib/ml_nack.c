/* The meaning of Nack codes (see ml_nack.h). The names come from the enum
 * descriptor protobuf-c generates from control.proto, so that a code added
 * to the protocol has its name here without anyone editing a table. */
#include "ml_nack.h"

#include "medlink/v1/control.pb-c.h"

int ml_nack_is_transient(int code)
{
    switch (code) {
    case MEDLINK__V1__NACK_CODE__NACK_STORE:
    case MEDLINK__V1__NACK_CODE__NACK_STORE_FULL:
    case MEDLINK__V1__NACK_CODE__NACK_RATE_LIMITED:
    case MEDLINK__V1__NACK_CODE__NACK_CONFLICT:
        return 1;
    default:
        return 0;
    }
}

const char *ml_nack_name(int code)
{
    const ProtobufCEnumValue *v =
        protobuf_c_enum_descriptor_get_value(&medlink__v1__nack_code__descriptor, code);
    return v ? v->name : "NACK_UNKNOWN";
}
