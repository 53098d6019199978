/* What a Nack's code means to the side that receives it: whether to send
 * the same message again later (a transient refusal: the broker could not
 * take it now, but will) or to give it up (a permanent refusal: sending it
 * again gets the same answer), and the code's name for logs and for
 * medlinkctl's output. One rule for every program, so that the agent,
 * medlinkctl and the test tools cannot drift apart on which refusals are
 * worth a retry. Pure functions, any thread. */
#ifndef ML_NACK_H
#define ML_NACK_H

/* 1 when a Nack with this code (a Medlink__V1__NackCode) asks the sender to
 * send the message again later, 0 when it refuses the message for good.
 * Transient: NACK_STORE (the store failed), NACK_STORE_FULL (the store is
 * over its quota), NACK_RATE_LIMITED (the sender is over its rate, or a
 * message before this one to the same recipient was refused for now and
 * must come first) and NACK_CONFLICT (the case changed while this message
 * was being stored). Every other code, and any code this build does not
 * know, is permanent: a peer's unknown code is never a reason to resend
 * forever. O(1). */
int ml_nack_is_transient(int code);

/* The code's name as the protocol spells it ("NACK_INVALID"), a static
 * string; "NACK_UNKNOWN" for a value the protocol does not define. Never
 * NULL. O(log n) in the number of codes. */
const char *ml_nack_name(int code);

#endif
