// Errors: the last message of the calling thread, set by every file of the core through se_error,
// read by se_last_error (the Python layer turns status + message into an exception).
#include "se-impl.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char last_error[1024];

int se_error(int status, const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

const char * se_last_error(void) { return last_error; }

const char * se_status_name(int status) {
    switch (status) {
        case SE_OK: return "SE_OK";
        case SE_ERR_INVALID_ARGUMENT: return "SE_ERR_INVALID_ARGUMENT";
        case SE_ERR_IO: return "SE_ERR_IO";
        case SE_ERR_FORMAT: return "SE_ERR_FORMAT";
        case SE_ERR_UNSUPPORTED: return "SE_ERR_UNSUPPORTED";
        case SE_ERR_OUT_OF_MEMORY: return "SE_ERR_OUT_OF_MEMORY";
        case SE_ERR_CONTEXT_FULL: return "SE_ERR_CONTEXT_FULL";
        case SE_ERR_BACKEND: return "SE_ERR_BACKEND";
        case SE_ERR_CANCELLED: return "SE_ERR_CANCELLED";
        case SE_ERR_NUMERICAL: return "SE_ERR_NUMERICAL";
        case SE_ERR_BUSY: return "SE_ERR_BUSY";
        default: return "SE_ERR_UNKNOWN";
    }
}
