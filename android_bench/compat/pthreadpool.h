/*
 * Host build only. The executorch pip wheel ships
 * executorch/extension/threadpool/threadpool.h but not the pthreadpool.h it
 * includes. threadpool.h needs just the opaque handle type and the destroy
 * function (as a unique_ptr deleter type); the real symbols live in the
 * wheel's _portable_lib. The Android build uses the real header from the
 * ExecuTorch install tree and never sees this file.
 */
#pragma once

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pthreadpool* pthreadpool_t;

void pthreadpool_destroy(pthreadpool_t threadpool);

#ifdef __cplusplus
}
#endif
