/* The receiving side of the agent's imaging module (reading centre):
 * transfers opened by delivered consults, chunks written into .part files
 * and recorded, objects verified, studies published into the spool's
 * inbox/, transfers that did not complete in time expired. It runs as a
 * plug-in of the agent's receive batch (inbox.h), which owns the
 * transaction. See imaging.h for the module and its crash points. Loop
 * thread only. */
#ifndef ML_AGENT_IMG_RECV_H
#define ML_AGENT_IMG_RECV_H

#include "inbox.h"

typedef struct ml_aimg ml_aimg_t;

/* Fills *p with the receiver's plug-in for ml_inbox_add_plugin: it takes
 * ImagingChunk deliveries (into their .part files and records, ack set per
 * chunk: one that could not be written is left for the broker to deliver
 * again) and acts on new imaging messages the spool stored (a consult
 * opens a transfer; updates, reports and resend requests reach the
 * sender's side), all inside the batch transaction; after the commit it
 * verifies completed objects and publishes completed studies. img must
 * outlive the plug-in's registration (ml_inbox_remove_plugins). */
void ml_aimg_inbox_plugin(ml_aimg_t *img, ml_inbox_plugin_t *p);

#endif
