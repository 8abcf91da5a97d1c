/* A slow disk for bench_loop_lag.py: every fsync and fdatasync of the process first sleeps
 * SLOW_FSYNC_MS milliseconds (an HDD or a network volume commits in 5-20 ms; this VM's disk in
 * 0.4). Loaded with LD_PRELOAD into the node and the sidecar only, never into tests. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>

static void slow_disk(void) {
    const char *value = getenv("SLOW_FSYNC_MS");
    long ms = value ? atol(value) : 0;
    struct timespec pause = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&pause, NULL);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    slow_disk();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    slow_disk();
    return real(fd);
}
