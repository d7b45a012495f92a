/*
 * idle_floor: what N processes cost that do nothing but wake every 100 ms.
 *
 * A blocked main thread wakes at least every 100 ms to run Python's signal handlers (the
 * README's "Platform notes" and "Performance" say why).  This program measures what that
 * costs on the machine it runs on, with no Python and no work of ours: N processes each loop on sem_clockwait() of one named POSIX
 * semaphore (glibc's is a futex in a shared mapping, as mpeventfd's are) that nobody
 * posts, each wait ending at a deadline on the monotonic clock.  P9's "idle waiters' CPU"
 * row (`python -m mpeventfd bench`) compares with it (README, "Performance").
 *
 * Two deadline rules, as mpeventfd's wait steps can use (mpeventfd/_core.c, wait_post):
 *   grid10:  the first 10 ms boundary at least 90 ms away (waiters that began at different
 *            times fall into ten batches a period);
 *   grid100: the next multiple of 100 ms (every waiter in one batch).
 * Waiters begin at spread-out times, as real ones do.  CPU is the waiters' own, summed
 * from /proc/<pid>/schedstat (ns; Linux only) over a few seconds.
 *
 *   gcc -O2 -o /tmp/idle_floor tools/idle_floor.c -lm -pthread && /tmp/idle_floor 256
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <math.h>
#include <semaphore.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PERIOD 0.1  /* a main thread runs signal handlers at least this often (STEP_MAIN) */
#define GRID 0.01   /* mpeventfd's STEP_GRID */
#define SETTLE 1    /* seconds for every waiter to be in its loop */
#define MEASURE 4.0 /* seconds measured */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void waiter(sem_t *s, int batched, int i)
{
    usleep((useconds_t)((i * 7919) % 100000)); /* spread the starts over one period */
    for (;;) {
        double t = now();
        double end = batched ? (floor(t / PERIOD) + 1) * PERIOD
                             : ceil((t + PERIOD - GRID) / GRID) * GRID;
        struct timespec ts = {(time_t)end, (long)((end - floor(end)) * 1e9)};
        sem_clockwait(s, CLOCK_MONOTONIC, &ts);
    }
}

static double cpu_of(const pid_t *pids, int n)
{
    double sum = 0;
    for (int i = 0; i < n; i++) {
        char path[64];
        unsigned long long ns = 0;
        snprintf(path, sizeof path, "/proc/%d/schedstat", (int)pids[i]);
        FILE *f = fopen(path, "r");
        if (!f || fscanf(f, "%llu", &ns) != 1) {
            fprintf(stderr, "idle_floor: cannot read %s\n", path);
            exit(1);
        }
        fclose(f);
        sum += (double)ns * 1e-9;
    }
    return sum;
}

static void measure(sem_t *s, int n, int batched)
{
    pid_t *pids = calloc((size_t)n, sizeof *pids);
    if (!pids)
        exit(1);
    for (int i = 0; i < n; i++) {
        if ((pids[i] = fork()) == 0)
            waiter(s, batched, i);
        if (pids[i] < 0) {
            perror("fork");
            n = i;
            break;
        }
    }
    sleep(SETTLE);
    double c0 = cpu_of(pids, n), t0 = now();
    usleep((useconds_t)(MEASURE * 1e6));
    double cores = (cpu_of(pids, n) - c0) / (now() - t0);
    printf("%-8s N=%-5d %.4f cores, %.1f µs of CPU per wake-up\n",
           batched ? "grid100" : "grid10", n, cores, cores / (n / PERIOD) * 1e6);
    for (int i = 0; i < n; i++)
        kill(pids[i], SIGKILL);
    for (int i = 0; i < n; i++)
        waitpid(pids[i], NULL, 0);
    free(pids);
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 256;
    if (n < 1 || n > 4096) {
        fprintf(stderr, "usage: idle_floor [N, 1..4096]\n");
        return 2;
    }
    char name[64];
    snprintf(name, sizeof name, "/mpefd-floor-%d", (int)getpid());
    sem_t *s = sem_open(name, O_CREAT | O_EXCL, 0600, 0);
    if (s == SEM_FAILED) {
        perror("sem_open");
        return 1;
    }
    sem_unlink(name); /* the children inherit the mapping; no name outlives us */
    measure(s, n, 0);
    measure(s, n, 1);
    return 0;
}
