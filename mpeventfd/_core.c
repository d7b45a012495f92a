/*
 * mpeventfd/_core.c - the critical sections and the waits of mpeventfd, each one C call.
 *
 * One eventfd is a shared page (a file on /dev/shm, mapped MAP_SHARED by every process
 * that holds it), a notifier pipe whose read end is fileno(), and two named semaphores on
 * which blocked readers and writers sleep.  docs/design.md explains the design; this file
 * holds every instruction that runs while an eventfd's lock is held, and every wait.
 *
 * Rules every function below keeps:
 *  - No Python object is touched, no memory allocated and the GIL never awaited while the
 *    cross-process lock is held: a contended lock is taken, used and released with the GIL
 *    released.  Python handlers run only between bytecodes, so none runs inside a section.
 *  - Every word of the shared page that changes after creation is a C11 atomic, accessed
 *    seq_cst (the default) unless a comment proves a weaker order enough.  x86 tests cannot
 *    catch an ordering bug; ARM users would.
 *  - Only a lock holder moves the counter across zero, so while the lock is held the
 *    counter's zero-ness changes only by the holder's own hand (docs/design.md, I2).
 *  - A transition that needs more than one store is bracketed by `dirty` (set before its
 *    first effect, cleared after its last); whoever next takes the lock and finds `dirty`,
 *    or gets EOWNERDEAD, repairs (I4).
 *  - Every section ends with the post rule for both classes (I15): no interleaving of
 *    sections and lock-free operations leaves a waiter that could proceed without a post.
 *  - A blocked waiter whose step expires takes no lock and scans nothing: it looks at two
 *    words, and takes the lock only if it could proceed (I7).
 *
 * Figures measured on one machine live in the README's "Performance" section, not here.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* What older CPythons (3.11, 3.12) lack. */
#if PY_VERSION_HEX < 0x030D0000
static int PyModule_Add(PyObject *m, const char *name, PyObject *value)
{
    int r = value ? PyModule_AddObjectRef(m, name, value) : -1;
    Py_XDECREF(value);
    return r;
}
#endif

/* Shared memory between processes needs atomics that never fall back to a process-local lock. */
_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "64-bit atomics must be lock-free");
_Static_assert(sizeof(unsigned long long) == 8, "64-bit words");
_Static_assert(sizeof(_Atomic uint64_t) == 8, "an atomic word is a plain word in the page");

#define MAX_VALUE 0xfffffffffffffffeULL
#define MAGIC 0x3456444645504d00ULL /* "\0MPEFDV4" read as a little-endian word */
#define VERSION 4
#define NSLOTS 1024 /* processes that may wait at once (EUSERS beyond) */
#define READER 0
#define WRITER 1

/* The lock kinds (header.mutex_kind) and where the byte locks live (header.carrier). */
#define MUTEX_ROBUST 1 /* a robust process-shared pthread mutex in the page */
#define MUTEX_BYTE 2   /* a kernel byte lock on the private description */
#define CARRIER_PIPE 1 /* OFD locks on a private read-write description of the pipe */
#define CARRIER_FILE 2 /* classic fcntl locks on the lock file (macOS, the BSDs) */
/* Byte offsets of the kernel byte locks: ranges name locks, they hold no data. */
#define MUTEX_BYTE_OFFSET 0
#define ATTACHED_BYTE 1    /* read-locked by every process attached (that will liveness-test) */
#define LIVENESS_BASE 4096 /* + slot index: locked by the slot's owner while it lives */

/* The C library that laid out the robust mutex in a page (header.libc): glibc's lock word
 * is musl's type field, so two libcs must never share one.  Probed by the compiler. */
#if defined(__GLIBC__)
#define LIBC 1
#elif defined(__APPLE__)
#define LIBC 3
#elif defined(__FreeBSD__)
#define LIBC 4
#elif defined(__NetBSD__) || defined(__OpenBSD__) || defined(__DragonFly__)
#define LIBC 5
#elif defined(__BIONIC__)
#define LIBC 6
#elif defined(__linux__)
#define LIBC 2 /* Linux without glibc's macro: musl (which defines none of its own) */
#else
#define LIBC 7
#endif
static const char *const libc_names[] = {"an unknown C library", "glibc", "musl", "macOS libc",
                                         "FreeBSD libc", "a BSD libc", "bionic",
                                         "another C library"};

/* Timing (seconds). */
#define STEP_MAIN 0.1   /* the main thread runs signal handlers at least this often */
#define STEP_OTHER 0.5  /* other waiters look again this often (a dead peer's leftovers) */
#define STEP_GRID 0.01  /* steps end on this grid of the monotonic clock (wait_post) */
#define PATIENCE 1.0    /* a non-blocking call waits this long for a held lock */
#define AIO_PATIENCE 1e-3 /* ... and aread's try_read about this long: it blocks a loop */
#define SWEEP_GAP 1.0   /* dead waiters' registrations are swept at most this often */
#define POST_BOUND 65536 /* posts per section: a scribbled count cannot loop for ever */
#define KICK_ROUNDS 4   /* sections an unlocker runs for requests made while it held the lock */
/* A blocking normal-mode read watches the counter this long before it sleeps (row S of
 * `python -m mpeventfd bench` chose it: README "Performance"). */
#define SPIN_READ 10e-6
#define LOCK_SPIN 2e-6  /* a busy robust mutex is retried this long, spinning, ... */
#define LOCK_YIELDS 3   /* ... then this many times, yielding the CPU, before sleeping on it */

/*
 * The shared page, word by word (layout version 4, native byte order).
 *
 * `struct header` is written once by the creator before `magic` (stored last, with release
 * order) and only read afterwards; attachers validate it first (read_header).  `struct
 * words` and the slots change after creation: every one is an atomic.
 */
struct header {
    uint64_t magic;      /*   0 */
    uint64_t version;    /*   8 */
    uint64_t size;       /*  16 */
    uint8_t id[16];      /*  24: the 128-bit id; names derive from it */
    uint64_t semaphore;  /*  40: EFD_SEMAPHORE, fixed */
    uint64_t mutex_kind; /*  48: MUTEX_ROBUST or MUTEX_BYTE */
    uint64_t carrier;    /*  56: CARRIER_PIPE or CARRIER_FILE */
    uint64_t creator;    /*  64: pid of the creator (diagnostics) */
    uint64_t pipe_dev;   /*  72: identity of the notifier pipe */
    uint64_t pipe_ino;   /*  80 */
    uint64_t sem_ino[2]; /*  88: inodes of the semaphores where the OS shows them (else 0) */
    uint64_t file_dev;   /* 104: identity of the lock file (CARRIER_FILE, else 0) */
    uint64_t file_ino;   /* 112 */
    uint64_t nslots;     /* 120 */
    uint64_t libc;       /* 128: LIBC of the creator, whose pthread_mutex_t is in the page */
    uint64_t ptr_bits;   /* 136: its pointer width */
    uint64_t mutex_size; /* 144: its sizeof(pthread_mutex_t) */
    uint8_t reserved[192 - 152];
};

/* W and P of one class share a word, so that a lock-free look reads them consistently. */
#define W_ONE (1ULL << 32)
#define COUNT_MAX 0xffffffffULL

struct words {
    _Atomic uint64_t counter;  /* 192: the eventfd counter, 0..MAX_VALUE */
    _Atomic uint64_t nonblock; /* 200: O_NONBLOCK of the one "open file description" */
    _Atomic uint64_t dirty;    /* 208: a holder is (or died) between related stores */
    _Atomic uint64_t armed;    /* 216: the pipe mirrors counter > 0 (readiness armed) */
    _Atomic uint64_t wp[2];    /* 224: per class, W << 32 | P: registered waiters W, and
                                *      posts accounted but not yet consumed-and-accounted P */
    _Atomic uint64_t kick;     /* 240: KICK_* bits: a lock-free commit asks for the rule */
    _Atomic uint64_t hwm;      /* 248: slots ever claimed (scan bound) */
    _Atomic uint64_t repairs;  /* 256: repairs done (diagnostics) */
    _Atomic uint64_t swept;    /* 264: monotonic ns of the last sweep of dead waiters */
    _Atomic uint64_t spare[6];
};
#define KICK_READERS 1ULL
#define KICK_WRITERS 2ULL

struct slot {
    _Atomic uint64_t pid;        /* owner, 0 = free; trusted only while its liveness byte is locked */
    _Atomic uint64_t waiting[2]; /* the owner's registered readers, writers (part of W) */
    _Atomic uint64_t spare;
};

struct page {
    struct header h; /*   0 */
    struct words w;  /* 192 */
    union {
        pthread_mutex_t m; /* MUTEX_ROBUST: glibc keeps its owner list pointers here */
        uint8_t reserve[128];
    } mutex;               /* 320 */
    uint8_t pad[512 - 448];
    struct slot slots[NSLOTS]; /* 512: one per process that waits */
};
/* What an attacher reads and validates before it maps the file (read_header). */
struct head {
    struct header h;
    struct words w;
};
_Static_assert(sizeof(struct header) == 192, "layout");
_Static_assert(offsetof(struct page, w) == 192, "layout");
_Static_assert(offsetof(struct page, mutex) == 320, "layout");
_Static_assert(offsetof(struct page, slots) == 512, "layout");
_Static_assert(sizeof(pthread_mutex_t) <= 128, "the mutex fits its reserve");
#define PAGE_BYTES sizeof(struct page) /* 33,280 bytes */

static inline uint64_t W_of(uint64_t wp) { return wp >> 32; }
static inline uint64_t P_of(uint64_t wp) { return wp & COUNT_MAX; }
static inline uint64_t pack(uint64_t w, uint64_t p)
{
    return (w > COUNT_MAX ? COUNT_MAX : w) << 32 | (p > COUNT_MAX ? COUNT_MAX : p);
}
static uint64_t min64(uint64_t a, uint64_t b) { return a < b ? a : b; }

/* -- fault injection (tests only) ----------------------------------------------------------
 * A test arms one named step with an action; every step costs one predictable branch on a
 * process-local word while unarmed.  Nothing in production arms it (no environment). */
#define STEPS(X) \
    X(WRITE_LOCKFREE, "write.lockfree") X(WRITE_LOCKED, "write.locked") \
    X(WRITE_DIRTY, "write.dirty") X(WRITE_PIPE, "write.pipe") \
    X(WRITE_COMMIT, "write.commit") X(WRITE_POSTED, "write.posted") \
    X(READ_LOCKFREE, "read.lockfree") X(READ_LOCKED, "read.locked") \
    X(READ_DIRTY, "read.dirty") X(READ_COMMIT, "read.commit") \
    X(READ_DRAINED, "read.drained") X(READ_POSTED, "read.posted") \
    X(WAIT_REGISTERED, "wait.registered") X(WAIT_STEP, "wait.step") \
    X(WAIT_WOKEN, "wait.woken") X(WAIT_ACCOUNTED, "wait.accounted") \
    X(KICK_SET, "kick.set") \
    X(LOCK_TAKEN, "lock.taken") X(LOCK_UNLOCKED, "lock.unlocked") \
    X(REPAIR_START, "repair.start") X(REPAIR_SLOTS, "repair.slots") \
    X(REPAIR_PIPE, "repair.pipe") X(REPAIR_POSTED, "repair.posted") \
    X(REPAIR_DONE, "repair.done") X(SLOT_CLAIMED, "slot.claimed")
#define AS_ENUM(e, s) STEP_##e,
#define AS_NAME(e, s) s,
enum { STEP_NONE = -1, STEPS(AS_ENUM) NSTEPS };
static const char *const step_names[] = {STEPS(AS_NAME)};
enum { ACT_KILL, ACT_STOP, ACT_EXIT, ACT_SIGNAL, ACT_BLOCK };
static _Atomic int fault_step = STEP_NONE; /* (a test arms it before the calls it hits) */
static int fault_action, fault_arg;
static _Atomic long fault_countdown;

static void fault_hit(int step)
{
    if (step != atomic_load(&fault_step) || atomic_fetch_sub(&fault_countdown, 1) > 1)
        return;
    atomic_store(&fault_step, STEP_NONE);
    switch (fault_action) {
    case ACT_KILL: kill(getpid(), SIGKILL); break;
    case ACT_STOP: kill(getpid(), SIGSTOP); break;
    case ACT_EXIT: _exit(86);
    case ACT_SIGNAL: raise(fault_arg); break; /* its Python handler runs after the section */
    case ACT_BLOCK: { /* hold here until the test writes a byte to (or closes) its pipe */
        /* A thread of the test holds the lock here.  If it also holds the GIL (the
         * uncontended path), it lets the GIL go meanwhile, so that the test's other
         * threads can run, and takes it back with the lock held: the one place that
         * awaits the GIL inside a section, and only ever in a test. */
        PyThreadState *ts = PyGILState_Check() ? PyEval_SaveThread() : NULL;
        char b;
        while (read(fault_arg, &b, 1) < 0 && errno == EINTR)
            ;
        if (ts)
            PyEval_RestoreThread(ts);
        break;
    }
    }
}
#define STEP(name) do { \
    if (__builtin_expect(atomic_load_explicit(&fault_step, memory_order_relaxed) != STEP_NONE, 0)) \
        fault_hit(STEP_##name); \
} while (0)

/* -- process-wide state -------------------------------------------------------------------
 *
 * One process, one interpreter: fork generations, the list of live cores the fork child
 * walks, and the statistics are the process's.  The module refuses to be imported into a
 * sub-interpreter (Py_mod_multiple_interpreters), and it runs without the GIL: every word
 * here that threads share is an atomic or under a lock, and a core's own state too (Core). */

static _Atomic unsigned long main_ident; /* the thread that runs Python's signal handlers */
static _Atomic unsigned long fork_gen; /* bumped in every fork child */
static _Atomic uint64_t woken;         /* posts consumed by this process (tests, stats) */
static _Atomic uint64_t woken_busy;    /* ... after which the lock was still held */
static _Atomic uint64_t looks;         /* expired wait steps that looked (stats) */
static _Atomic uint64_t looks_locked;  /* ... and then took the lock (stats) */
static _Atomic int64_t spin_ns;        /* the read spin, in ns (0: none) */
static _Atomic int64_t step_ns = (int64_t)(STEP_OTHER * 1e9); /* other waiters' step (_step) */
static int lock_cpus = 1;              /* CPUs we may run on, set at import: no spinning on one */

/* Calls in flight on a core: with the GIL a plain count, which only the GIL holder changes;
 * free-threaded an atomic one (enter_call has the ordering argument). */
#ifdef Py_GIL_DISABLED
typedef _Atomic int flight_t;
#define FLIGHT_ADD(x, d) (atomic_fetch_add(&(x), (d)) + (d))
#define FLIGHT_LOAD(x) atomic_load(&(x))
#else
typedef int flight_t;
#define FLIGHT_ADD(x, d) ((x) += (d))
#define FLIGHT_LOAD(x) (x)
#endif

typedef struct Core Core;
struct Core {
    PyObject_HEAD
    struct page *pg;       /* MAP_SHARED; mapped by us (no dup of the fd, unlike mmap.mmap) */
    int fd[3];             /* state file, pipe read end (fileno), write end: they travel */
    int priv;              /* private description: byte locks and the drain; -1 in a fork child */
    int spare;             /* a private description opened for the next fork child */
    sem_t *sem[2];         /* blocked readers, writers */
    int semaphore;         /* header.semaphore, cached */
    int mutex_kind, carrier;
    int poll_waits;        /* no timed semaphore wait here: trywait with a back-off */
    int slot;              /* our slot, -1 until we first wait (changed under the page's lock) */
    _Atomic unsigned long gen; /* the fork generation priv, slot and local belong to */
    _Atomic uint64_t abandoned[2]; /* registrations left without the lock, settled later */
    pthread_mutex_t local; /* MUTEX_BYTE: a byte lock cannot tell threads apart */
    flight_t inflight;     /* calls in flight (enter_call .. leave_call) */
    _Atomic int closed, freed; /* close() was called; every resource is released */
    _Atomic int stuck;     /* try_read's last wait for the lock timed out (core_try_read) */
    /* Counters for stats() (relaxed: nothing is ordered by them): try_read calls, and those
     * of them that waited AIO_PATIENCE for the lock in vain, the event loop blocked meanwhile. */
    _Atomic unsigned long try_reads, try_read_stalls;
    pthread_mutex_t state; /* close, reopen, free and a fork child's ensure_own, one at a time */
    int alone;             /* at free: no other attached process was left */
    _Atomic int saw_death; /* this process repaired after a holder died (lifecycle waits) */
    PyObject *on_free;     /* called once resources are freed after close() */
    char *file_path;       /* CARRIER_FILE: the lock file */
    Core *next, *prev;     /* every live core, for the fork child (cores_lock) */
};
static Core all_cores; /* list head */
static pthread_mutex_t cores_lock = PTHREAD_MUTEX_INITIALIZER;

/* -- small helpers ------------------------------------------------------------------------ */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static struct timespec monotonic_ts(double t)
{
    struct timespec ts;
    if (t > 1e15) /* for ever, in any time_t */
        t = 1e15;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
    return ts;
}

/* A monotonic deadline as CLOCK_REALTIME, for the POSIX waits that take only that clock. */
static inline struct timespec realtime_ts(double t)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return monotonic_ts((double)ts.tv_sec + ts.tv_nsec * 1e-9 + (t - now()));
}

static void nap(double seconds)
{
    struct timespec ts = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
    nanosleep(&ts, NULL); /* an EINTR ends it early: the caller re-checks */
}

static int is_main_thread(void)
{
    return PyThread_get_thread_ident() == atomic_load_explicit(&main_ident, memory_order_relaxed);
}

/* Raise OSError(code, message): Python picks the subclass (BlockingIOError, TimeoutError). */
static void set_oserror(int code, const char *detail)
{
    PyObject *e = PyObject_CallFunction(PyExc_OSError, "is", code, detail);
    if (e) {
        PyErr_SetObject((PyObject *)Py_TYPE(e), e);
        Py_DECREF(e);
    }
}

/* -- kernel byte locks on the private description ----------------------------------------- */

#ifdef HAVE_OFD_LOCKS
#define OFD_SETLK F_OFD_SETLK
#define OFD_GETLK F_OFD_GETLK
#else
#define OFD_SETLK F_SETLK
#define OFD_GETLK F_GETLK
#endif

/* One byte lock command on the private description: OFD locks on the pipe (they belong to
 * the description), classic fcntl locks on the lock file (they belong to the process). */
static int byte_fcntl(Core *c, int ofd_cmd, int classic_cmd, struct flock *fl)
{
    return fcntl(c->priv, c->carrier == CARRIER_PIPE ? ofd_cmd : classic_cmd, fl);
}

static struct flock one_byte(short type, off_t start)
{
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = 1; /* always one byte: a whole-file unlock would drop the liveness bytes too */
    return fl;
}

/* Take (F_WRLCK) or drop (F_UNLCK) one byte lock without waiting; 0, or -1 if busy. */
static int byte_try(Core *c, short type, off_t start)
{
    struct flock fl = one_byte(type, start);
    return byte_fcntl(c, OFD_SETLK, F_SETLK, &fl) == 0 ? 0 : -1;
}

/* True while some other description (or process) holds the byte.  Our own locks are
 * invisible to the query (same description, or same process), so never ask about ours. */
static int byte_held_elsewhere(Core *c, off_t start)
{
    struct flock fl = one_byte(F_WRLCK, start);
    if (byte_fcntl(c, OFD_GETLK, F_GETLK, &fl) != 0)
        return 1; /* cannot tell: never treat a process as dead on a doubt */
    return fl.l_type != F_UNLCK;
}

static int slot_alive(Core *c, int i) { return byte_held_elsewhere(c, LIVENESS_BASE + i); }

/* -- the notifier pipe -------------------------------------------------------------------- */

/* Make fileno() readable.  A full pipe already is, so EAGAIN is success. */
static void pipe_byte(Core *c)
{
    /* Through our own non-blocking description where we have one: a user may have made
     * the shared write end blocking (and the pipe full). */
    static const char one = 1;
    int fd = c->carrier == CARRIER_PIPE ? c->priv : c->fd[2];
    while (write(fd, &one, 1) < 0 && errno == EINTR)
        ;
}

static int pipe_pending(Core *c)
{
    int n = 0;
    if (ioctl(c->fd[1], FIONREAD, &n) != 0)
        return 0;
    return n;
}

/* Empty the pipe without ever blocking, whatever a user did to fileno()'s O_NONBLOCK: through
 * our own non-blocking description of it (CARRIER_PIPE), else reading only what FIONREAD
 * promises is there. */
static void pipe_drain(Core *c)
{
    char buf[256];
    if (c->carrier == CARRIER_PIPE) {
        ssize_t n;
        while ((n = read(c->priv, buf, sizeof buf)) == (ssize_t)sizeof buf || (n < 0 && errno == EINTR))
            ;
        return;
    }
    int left;
    while ((left = pipe_pending(c)) > 0) {
        if (read(c->fd[1], buf, left < (int)sizeof buf ? (size_t)left : sizeof buf) <= 0 && errno != EINTR)
            return;
    }
}

/* Make the pipe match the counter (lock held: its zero-ness is ours to change). */
static void pipe_match(Core *c)
{
    int queued = pipe_pending(c);
    uint64_t cnt = atomic_load(&c->pg->w.counter);
    if (cnt && !queued)
        pipe_byte(c);
    else if (!cnt && queued)
        pipe_drain(c);
}

/* -- wake-ups: the post rule and its accounting (tools/wake_model.py checks it) -------------
 *
 * Per class the page counts registered waiters W and posts accounted but not yet consumed
 * and accounted P, both in one word (wp) so that a lock-free look reads them consistently;
 * each slot counts its own process's waiters.  Only lock holders change wp.
 *
 * The rule, at the end of every section (post_rule):
 *   readers: post until P covers the readers that can proceed, min(c, W) in semaphore mode
 *            and min(1, W) otherwise (c > 0);
 *   writers: when room grew (a read in this section, a kick, a repair), post until P covers
 *            every registered writer: their sizes differ, each re-checks its own.
 * Posts are accounted under the lock (account_posts) and made right after the unlock
 * (make_posts): a reader woken while the lock is still held would sleep again, on the lock.
 *
 * A waiter, after its wait step: consumed a post -> W - 1, P - 1 (under the lock); its step
 * expired -> it looks (look): if it cannot proceed it sleeps again with nothing taken; if it
 * can (a death left its post unmade, or a dead waiter's consumed post is still counted),
 * it takes the lock:
 * W - 1, and if then P > W, P - 1 and one sem_trywait (a post that came as the step ended is
 * absorbed; one that a dead poster never made leaves the count all the same).  Every doubt
 * errs towards a stray post, never a missing one (I6).
 *
 * Lock-free commits cannot run the rule themselves: a kick asks the lock holder to.
 *
 *   lock-free writer (A)                       lock holder (B)
 *   CAS counter c -> c + v                     ... section ... post_rule (kick := 0)
 *   load wp: P < readers_ready(c + v)          unlock
 *   kick |= KICK_READERS                       fence
 *   fence                                      load kick
 *   trylock: DONE -> the rule itself           set -> trylock: DONE -> the rule
 *            BUSY -> B holds it (below)                          BUSY -> its holder looks
 *
 * A's failed trylock read the lock word before B's unlock stored it; with both fences
 * seq_cst, B's load of kick then sees A's bit (the store-buffering pattern: of two threads
 * that each store and then load the other's word, one sees the other's store).  So every
 * kick is served by a holder that takes the lock after it was set, and a committed write
 * never gives up its post, however long the lock stays busy.  A death between the bit and
 * its service leaves the bit set: the next section, or a waiter's look, serves it.
 *
 * Readers register only at c == 0, under the lock, and only lock holders leave 0 (I2): a
 * 0 -> n write, locked, sees every reader registration.  Writers register at c > 0, where
 * lock-free semaphore reads make room; that pair is ordered as a Dekker pair:
 *
 *   registering writer (under the lock)        lock-free semaphore read
 *   W_w += 1                                   CAS counter c -> c - 1
 *   load counter: room for v?                  load wp[WRITER]: P_w < W_w?
 *     yes -> unregister and retry                yes -> kick |= KICK_WRITERS
 *
 * All four accesses are seq_cst, so one of the two sees the other: the writer sees the room
 * and never sleeps, or the read sees the writer and kicks.
 */

/* Posts this thread's section has accounted and will make once it unlocks. */
static _Thread_local uint32_t owed[2];

static uint64_t wp_load(Core *c, int cls) { return atomic_load(&c->pg->w.wp[cls]); }

/* Set one class's W and P: lock holders only, so a store (lock-free looks read it). */
static void wp_store(Core *c, int cls, uint64_t w, uint64_t p)
{
    atomic_store(&c->pg->w.wp[cls], pack(w, p));
}

/* Readers that can proceed on a counter `cnt` with `w` of them registered. */
static uint64_t readers_ready(Core *c, uint64_t cnt, uint64_t w)
{
    if (!cnt || !w)
        return 0;
    return c->semaphore ? min64(cnt, w) : 1;
}

/* Account n more posts now; they are made after the unlock (make_posts). */
static void account_posts(Core *c, int cls, uint64_t wp, uint64_t n)
{
    n = min64(n, POST_BOUND); /* (a scribbled count cannot loop for ever) */
    wp_store(c, cls, W_of(wp), P_of(wp) + n);
    owed[cls] += (uint32_t)n;
}

/* The rule for both classes, at the end of every section (lock held).  `wants` has
 * KICK_WRITERS when the section made room; a kick adds what lock-free commits asked for. */
static void post_rule(Core *c, uint64_t wants)
{
    struct page *p = c->pg;
    wants |= atomic_exchange(&p->w.kick, 0); /* requests made after this wait for our unlock */
    uint64_t wp = wp_load(c, READER);
    uint64_t ready = readers_ready(c, atomic_load(&p->w.counter), W_of(wp));
    if (P_of(wp) < ready)
        account_posts(c, READER, wp, ready - P_of(wp));
    if (wants & KICK_WRITERS) {
        wp = wp_load(c, WRITER);
        if (P_of(wp) < W_of(wp))
            account_posts(c, WRITER, wp, W_of(wp) - P_of(wp));
    }
}

/* After the unlock: the posts accounted under the lock.  A death before they are made
 * loses them; the waiters' looks find out. */
static void make_posts(Core *c)
{
    for (int cls = READER; cls <= WRITER; cls++)
        for (; owed[cls]; owed[cls]--)
            if (sem_post(c->sem[cls]) != 0) { /* EOVERFLOW: more pending than anyone can use */
                owed[cls] = 0;
                break;
            }
}

/* -- slots: who waits, per process, for the registrations of the dead ----------------------- */

/* Drop a dead slot's registrations, assuming each consumed a post (I6; dirty is set). */
static void forget_slot(Core *c, int i)
{
    struct slot *s = &c->pg->slots[i];
    for (int cls = READER; cls <= WRITER; cls++) {
        uint64_t n = atomic_load(&s->waiting[cls]);
        if (n) {
            uint64_t wp = wp_load(c, cls);
            wp_store(c, cls, W_of(wp) - min64(W_of(wp), n), P_of(wp) - min64(P_of(wp), n));
            atomic_store(&s->waiting[cls], 0);
        }
    }
    atomic_store(&s->pid, 0);
}

/* Forget the registrations of processes whose liveness byte the kernel released: one query
 * per slot with waiters.  Only where it matters: a repair, or a waiter that finds posts
 * wrong (maybe_sweep); never at every step. */
static void sweep_dead(Core *c)
{
    struct page *p = c->pg;
    uint64_t hwm = min64(atomic_load(&p->w.hwm), NSLOTS);
    for (int i = 0; i < (int)hwm; i++) {
        struct slot *s = &p->slots[i];
        if (i == c->slot || !(atomic_load(&s->waiting[READER]) || atomic_load(&s->waiting[WRITER])))
            continue;
        if (!slot_alive(c, i))
            forget_slot(c, i);
    }
}

/* A waiter found its posts wrong (it could proceed but was not posted, or was posted for
 * nothing): registrations of the dead may be the cause.  One sweep per SWEEP_GAP among all
 * processes: the first to claim the time does it. */
static void maybe_sweep(Core *c)
{
    struct page *p = c->pg;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t t = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    uint64_t last = atomic_load(&p->w.swept);
    /* (t < last: another clock, in another time namespace; sweep rather than never) */
    if (t >= last && t - last < (uint64_t)(SWEEP_GAP * 1e9))
        return;
    atomic_store(&p->w.swept, t); /* (the lock is held: no other sweeper races us) */
    atomic_store(&p->w.dirty, 1);
    sweep_dead(c);
    atomic_store(&p->w.dirty, 0);
}

/* Claim a slot: lock a liveness byte first, then take over whatever a dead owner left.
 * Fresh slots first (nobody ever held their bytes: a joining process costs one try), then
 * the slots of processes that are gone. */
static int claim_slot(Core *c)
{
    struct page *p = c->pg;
    uint64_t hwm = min64(atomic_load(&p->w.hwm), NSLOTS);
    for (int k = 0; k < NSLOTS; k++) {
        int i = (int)((hwm + (uint64_t)k) % NSLOTS);
        if (byte_try(c, F_WRLCK, LIVENESS_BASE + i) != 0)
            continue; /* its owner lives */
        atomic_store(&p->w.dirty, 1);
        forget_slot(c, i);
        atomic_store(&p->slots[i].pid, (uint64_t)getpid());
        if ((uint64_t)i >= atomic_load(&p->w.hwm))
            atomic_store(&p->w.hwm, (uint64_t)i + 1);
        atomic_store(&p->w.dirty, 0);
        c->slot = i;
        STEP(SLOT_CLAIMED);
        return 0;
    }
    return -1;
}

static int register_waiter(Core *c, int cls)
{
    struct page *p = c->pg;
    if (c->slot < 0 && claim_slot(c) != 0)
        return -1;
    uint64_t wp = wp_load(c, cls);
    atomic_store(&p->w.dirty, 1);
    wp_store(c, cls, W_of(wp) + 1, P_of(wp));
    atomic_fetch_add(&p->slots[c->slot].waiting[cls], 1);
    atomic_store(&p->w.dirty, 0);
    return 0;
}

/* How a registration ends. */
enum { NOWAIT, CONSUMED, EXPIRED };

/* Account a registration whose wait step ended `how` (NOWAIT: it never waited). */
static void unregister(Core *c, int cls, int how)
{
    struct page *p = c->pg;
    struct slot *s = &p->slots[c->slot];
    uint64_t wp = wp_load(c, cls), w = W_of(wp), posted = P_of(wp);
    w -= min64(w, 1);
    if (how == CONSUMED)
        posted -= min64(posted, 1);
    atomic_store(&p->w.dirty, 1);
    wp_store(c, cls, w, posted);
    uint64_t mine = atomic_load(&s->waiting[cls]);
    atomic_store(&s->waiting[cls], mine - min64(mine, 1));
    atomic_store(&p->w.dirty, 0);
    if (how == EXPIRED && posted > w) {
        /* More posts accounted than waiters: a post meant for us arrived as the step ended
         * (absorb it, so strays cannot pile up), or its poster died between unlocking and
         * posting (then there is none to take, and the count drops all the same).  Were it
         * only late, it becomes a stray: a spurious wake-up, never a lost one (I6). */
        wp_store(c, cls, w, posted - 1);
        sem_trywait(c->sem[cls]);
    }
}

static void settle_abandoned(Core *c)
{
    for (int cls = READER; cls <= WRITER; cls++) {
        if (!atomic_load_explicit(&c->abandoned[cls], memory_order_relaxed))
            continue; /* (process-local; the exchange below is the real read) */
        for (uint64_t n = atomic_exchange(&c->abandoned[cls], 0); n; n--)
            unregister(c, cls, EXPIRED); /* (a consumed post was given back: abandon) */
    }
}

/* A holder died between related updates (dirty set, or EOWNERDEAD): re-derive everything
 * from committed values.  Idempotent, and dirty stays set until the end, so a death during
 * the repair only makes the next holder repeat it.  The rule itself runs at the end of the
 * section the repairer is in (the kick bits ask for both classes). */
static void repair(Core *c)
{
    struct page *p = c->pg;
    STEP(REPAIR_START);
    atomic_store(&p->w.dirty, 1);
    sweep_dead(c);
    uint64_t hwm = min64(atomic_load(&p->w.hwm), NSLOTS), w[2] = {0, 0};
    for (int i = 0; i < (int)hwm; i++)
        if (atomic_load(&p->slots[i].pid))
            for (int cls = READER; cls <= WRITER; cls++)
                w[cls] += atomic_load(&p->slots[i].waiting[cls]);
    for (int cls = READER; cls <= WRITER; cls++)
        wp_store(c, cls, w[cls], min64(P_of(wp_load(c, cls)), w[cls]));
    STEP(REPAIR_SLOTS);
    if (atomic_load(&p->w.armed))
        pipe_match(c); /* lock-free writers act only on c > 0: the zero-ness holds */
    STEP(REPAIR_PIPE);
    atomic_fetch_or(&p->w.kick, KICK_READERS | KICK_WRITERS); /* a dead holder's posts */
    STEP(REPAIR_POSTED);
    atomic_fetch_add(&p->w.repairs, 1);
    atomic_store(&p->w.dirty, 0);
    STEP(REPAIR_DONE);
}

/* -- the operation: one context for every step of a call ------------------------------------ */

enum { OP_READ, OP_WRITE, OP_ARM, OP_RULE };

/* What a call, and each of its steps, ends with: one vocabulary. */
enum {
    DONE,     /* finished (a read: o->v holds what it took); the lock: held */
    BLOCKED,  /* registered as a waiter: wait, then come back */
    AGAIN,    /* it would have to wait for the counter and may not (EAGAIN) */
    TIMEDOUT, /* the deadline passed (ETIMEDOUT) */
    BUSY,     /* the lock stayed held past the caller's patience */
    NOSLOT,   /* every waiter slot is taken (EUSERS) */
    CORRUPT,  /* a shared word is out of range, or the mutex is not recoverable */
    LOCKFAIL, /* the lock returned what it never should (o->err) */
    PYERR,    /* a Python exception is set (a signal handler raised) */
    FORKED,   /* a signal handler forked: this is the child, whose call ends */
};

struct op {
    Core *c;
    int kind;          /* OP_* */
    int cls;           /* the class it waits as: READER for reads, WRITER for writes */
    uint64_t v;        /* the value written; what a read took */
    double until;      /* deadline for the counter: -1 never waits, INFINITY never gives up */
    double lock_until; /* deadline for the lock */
    int spin;          /* watch the counter before sleeping (a blocking normal-mode read) */
    int signals;       /* the main thread: run signal handlers between steps */
    int registered;    /* a registration of this call is counted in the page */
    int woke;          /* its last wait step consumed a post */
    int died;          /* the lock's previous holder died inside (EOWNERDEAD) */
    int err;           /* LOCKFAIL: what the lock returned */
    unsigned long gen; /* the fork generation at entry */
    PyThreadState *ts; /* while the GIL is released */
};

/* -- the lock ------------------------------------------------------------------------------ */

/* A pthread result as a step result. */
static int lock_result(struct op *o, int err)
{
    switch (err) {
    case 0: return DONE;
    case EOWNERDEAD: o->died = 1; return DONE; /* held; its last holder died inside */
    case EBUSY:
    case ETIMEDOUT: return BUSY;
    case ENOTRECOVERABLE: return CORRUPT;
    default: o->err = err; return LOCKFAIL; /* EINVAL, EDEADLK: a damaged mutex */
    }
}

/* Try once. */
static int lock_try(struct op *o)
{
    Core *c = o->c;
#ifdef HAVE_ROBUST_MUTEX
    if (c->mutex_kind == MUTEX_ROBUST)
        return lock_result(o, pthread_mutex_trylock(&c->pg->mutex.m));
#endif
    if (pthread_mutex_trylock(&c->local) != 0)
        return BUSY;
    if (byte_try(c, F_WRLCK, MUTEX_BYTE_OFFSET) != 0) {
        int e = errno;
        pthread_mutex_unlock(&c->local);
        if (e == EAGAIN || e == EACCES || e == EINTR) /* held (fcntl(2)) */
            return BUSY;
        o->err = e;
        return LOCKFAIL;
    }
    return DONE;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* A section holds the lock for a fraction of a microsecond while its holder runs: a busy
 * robust mutex is retried for LOCK_SPIN before anything else (an adaptive mutex; robust
 * mutexes do not spin), by the clock, since a PAUSE lasts anything from under 1 ns to tens.
 * Not for the byte lock, whose every try is a system call, and not on one CPU. */
static int lock_spin(struct op *o)
{
    int r = lock_try(o);
    if (r != BUSY || o->c->mutex_kind != MUTEX_ROBUST || lock_cpus < 2)
        return r;
    double end = now() + LOCK_SPIN;
    do {
        for (int j = 0; j < 8; j++)
            cpu_relax();
        r = lock_try(o);
    } while (r == BUSY && now() < end);
    return r;
}

/* A holder still busy past the spin has usually been preempted, often by the very wake-up
 * its section caused (a pipe byte goes in before a commit): yielding the CPU a few times
 * lets a holder that waits for this CPU finish, which costs less than a sleep on the lock
 * and a wake-up from its unlock.  Without the GIL: a yield may last a scheduler slice; and
 * none starts after `stop`.  (On one CPU too, where the holder can only be waiting for it.) */
static int lock_yield(struct op *o, double stop)
{
    int r = lock_try(o);
    for (int i = 0; i < LOCK_YIELDS && r == BUSY && o->c->mutex_kind == MUTEX_ROBUST &&
                    now() < stop; i++) {
        sched_yield();
        r = lock_try(o);
    }
    return r;
}

/* Wait for a pthread mutex until `stop` (monotonic); 0 or an errno.  (ThreadSanitizer
 * builds take timedlock: gcc 12's ThreadSanitizer does not intercept clocklock, and would
 * report the unlock that follows as the unlock of an unlocked mutex.) */
static int mutex_until(pthread_mutex_t *m, double stop)
{
#if defined(HAVE_MUTEX_CLOCKLOCK) && !defined(__SANITIZE_THREAD__)
    struct timespec ts = monotonic_ts(stop);
    return pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &ts);
#elif defined(HAVE_MUTEX_TIMEDLOCK)
    struct timespec ts = realtime_ts(stop);
    return pthread_mutex_timedlock(m, &ts);
#else
    int r;
    while ((r = pthread_mutex_trylock(m)) == EBUSY && now() < stop)
        nap(50e-6);
    return r;
#endif
}

/* Wait for the lock until `stop` (monotonic), without the GIL. */
static int lock_wait(struct op *o, double stop)
{
    Core *c = o->c;
#ifdef HAVE_ROBUST_MUTEX
    if (c->mutex_kind == MUTEX_ROBUST)
        return lock_result(o, mutex_until(&c->pg->mutex.m, stop));
#endif
    if (mutex_until(&c->local, stop) != 0)
        return BUSY;
    /* F_SETLKW cannot time out, and a stopped holder must not hold a timed call hostage:
     * poll with a back-off.  Live holders keep the lock for microseconds. */
    double delay = 20e-6;
    for (;;) {
        if (byte_try(c, F_WRLCK, MUTEX_BYTE_OFFSET) == 0)
            return DONE;
        int e = errno;
        double left = stop - now();
        if (left <= 0 || !(e == EAGAIN || e == EACCES || e == EINTR)) {
            pthread_mutex_unlock(&c->local);
            if (left <= 0)
                return BUSY;
            o->err = e;
            return LOCKFAIL;
        }
        nap(delay < left ? delay : left);
        delay = delay * 2 < 2e-3 ? delay * 2 : 2e-3;
    }
}

static void unlock(Core *c)
{
#ifdef HAVE_ROBUST_MUTEX
    if (c->mutex_kind == MUTEX_ROBUST)
        pthread_mutex_unlock(&c->pg->mutex.m);
    else
#endif
    {
        byte_try(c, F_UNLCK, MUTEX_BYTE_OFFSET);
        pthread_mutex_unlock(&c->local);
    }
}

/* The lock was just taken: repair what a dead holder left, then mark a robust mutex consistent
 * (unlocking without that would make it ENOTRECOVERABLE for good). */
static void after_taking(struct op *o)
{
    Core *c = o->c;
    STEP(LOCK_TAKEN);
    if (o->died || atomic_load(&c->pg->w.dirty)) {
        repair(c);
        atomic_store(&c->saw_death, 1);
    }
#ifdef HAVE_ROBUST_MUTEX
    if (o->died)
        pthread_mutex_consistent(&c->pg->mutex.m);
#endif
    o->died = 0;
}

/* Take the lock without waiting for it (DONE: held, and repaired). */
static int enter_try(struct op *o)
{
    int r = lock_try(o);
    if (r == DONE)
        after_taking(o);
    return r;
}

/* -- the sections -------------------------------------------------------------------------- */

/* n -> 0: a normal read, or a semaphore read of 1.  The drain comes after the commit.
 * Returns what was taken, or 0 when a lock-free writer changed a semaphore-mode 1 first. */
static uint64_t take_all(Core *c, uint64_t cnt)
{
    struct page *p = c->pg;
    atomic_store(&p->w.dirty, 1);
    STEP(READ_DIRTY);
    uint64_t got = 1;
    if (!c->semaphore)
        got = atomic_exchange(&p->w.counter, 0); /* with whatever lock-free writers added */
    else if (!atomic_compare_exchange_strong(&p->w.counter, &cnt, 0)) {
        atomic_store(&p->w.dirty, 0); /* nothing done: the caller looks again */
        return 0;
    }
    STEP(READ_COMMIT);
    if (atomic_load(&p->w.armed))
        pipe_drain(c);
    STEP(READ_DRAINED);
    atomic_store(&p->w.dirty, 0);
    return got;
}

/* 0 -> v: the pipe byte goes in before the commit.  Nobody else moves a zero counter. */
static void give_from_zero(Core *c, uint64_t v)
{
    struct page *p = c->pg;
    atomic_store(&p->w.dirty, 1);
    STEP(WRITE_DIRTY);
    if (atomic_load(&p->w.armed))
        pipe_byte(c);
    STEP(WRITE_PIPE);
    atomic_store(&p->w.counter, v);
    STEP(WRITE_COMMIT);
    atomic_store(&p->w.dirty, 0);
}

/* Can the operation proceed on counter `cnt`? */
static int can_proceed(struct op *o, uint64_t cnt)
{
    if (cnt > MAX_VALUE)
        return 1; /* corrupt: go and report it */
    return o->kind == OP_READ ? cnt > 0 : o->v <= MAX_VALUE - cnt;
}

/* One attempt at the operation (lock held): DONE, BLOCKED (it cannot proceed now), CORRUPT;
 * AGAIN when a lock-free operation changed the counter under it (look again).  `*room`
 * gets KICK_WRITERS when the attempt made room. */
static int attempt(struct op *o, uint64_t *room)
{
    Core *c = o->c;
    struct page *p = c->pg;
    uint64_t cnt = atomic_load(&p->w.counter);
    if (cnt > MAX_VALUE)
        return CORRUPT;
    if (!can_proceed(o, cnt))
        return BLOCKED;
    if (o->kind == OP_READ) {
        *room = KICK_WRITERS;
        if (c->semaphore && cnt >= 2) {
            /* Stays > 0: lock-free readers and writers may move it meanwhile, so CAS. */
            if (!atomic_compare_exchange_strong(&p->w.counter, &cnt, cnt - 1))
                return AGAIN;
            STEP(READ_COMMIT);
            o->v = 1;
            return DONE;
        }
        o->v = take_all(c, cnt);
        return o->v ? DONE : AGAIN;
    }
    if (!o->v)
        return DONE; /* write(0): always succeeds, changes nothing */
    if (!cnt) {
        give_from_zero(c, o->v);
        return DONE;
    }
    if (!atomic_compare_exchange_strong(&p->w.counter, &cnt, cnt + o->v))
        return AGAIN;
    STEP(WRITE_COMMIT);
    return DONE;
}

/* The operation proper (lock held): done, or registered to wait, or why not. */
static int transition(struct op *o, uint64_t *room)
{
    Core *c = o->c;
    if (o->kind == OP_WRITE)
        STEP(WRITE_LOCKED);
    else
        STEP(READ_LOCKED);
    for (;;) {
        int r = attempt(o, room);
        if (r == AGAIN)
            continue;
        if (r != BLOCKED)
            return r;
        if (o->until < 0)
            return AGAIN;
        if (o->until <= now())
            return TIMEDOUT;
        if (register_waiter(c, o->cls) != 0)
            return NOSLOT;
        if (o->kind == OP_WRITE && can_proceed(o, atomic_load(&c->pg->w.counter))) {
            unregister(c, o->cls, NOWAIT); /* the Dekker pair: a lock-free read made room */
            continue;
        }
        o->registered = 1;
        STEP(WAIT_REGISTERED);
        return BLOCKED;
    }
}

/* The registration of this call's last wait ends (lock held). */
static void end_wait(struct op *o)
{
    Core *c = o->c;
    unregister(c, o->cls, o->woke ? CONSUMED : EXPIRED);
    o->registered = 0;
    STEP(WAIT_ACCOUNTED);
    if (o->kind == OP_RULE)
        return; /* abandoned: the call ends */
    /* Posted, yet nothing to take; or not posted, yet able to proceed: registrations of
     * the dead may be what skews the rule (a dead waiter's consumed post still counted).
     * A race lost to a lock-free read looks the same, hence the rate limit. */
    if (o->woke != can_proceed(o, atomic_load(&c->pg->w.counter)))
        maybe_sweep(c);
}

/* One critical section; the lock is held.  Settles what the call's last wait left, runs
 * the operation, and ends with the post rule for both classes (I15). */
static int section(struct op *o)
{
    Core *c = o->c;
    uint64_t room = 0;
    int r = DONE;
    settle_abandoned(c);
    if (o->registered)
        end_wait(o);
    if (o->kind == OP_READ || o->kind == OP_WRITE) {
        r = transition(o, &room);
    } else if (o->kind == OP_ARM && !atomic_load(&c->pg->w.armed)) {
        pipe_match(c); /* readiness, for good: the pipe matches the counter first */
        atomic_store(&c->pg->w.armed, 1);
    }
    post_rule(c, room);
    if (r == DONE && o->kind == OP_READ)
        STEP(READ_POSTED);
    else if (r == DONE && o->kind == OP_WRITE)
        STEP(WRITE_POSTED);
    return r;
}

/* Unlock, make the posts the section accounted, and serve the kicks that lock-free commits
 * made while we held the lock (the ordering argument is at the top of "wake-ups"). */
static void leave(struct op *o)
{
    Core *c = o->c;
    for (int round = 0;; round++) {
        unlock(c);
        STEP(LOCK_UNLOCKED);
        make_posts(c);
        atomic_thread_fence(memory_order_seq_cst);
        if (round == KICK_ROUNDS || !atomic_load(&c->pg->w.kick))
            return; /* (a kick left now is served by the next section, or a waiter's look) */
        struct op k = {.c = c, .kind = OP_RULE};
        if (enter_try(&k) != DONE)
            return; /* its holder will look when it unlocks */
        section(&k);
    }
}

/* A lock-free commit that waiters of `bits` must hear of: ask for the rule, and run it
 * now if the lock is free; never wait for it (a committed write keeps its post anyway). */
static int ensure_own(Core *c);

static void kick(Core *c, uint64_t bits)
{
    atomic_fetch_or(&c->pg->w.kick, bits);
    STEP(KICK_SET);
    atomic_thread_fence(memory_order_seq_cst);
    if (ensure_own(c) != 0) { /* (a fork child without its description: a look serves it) */
        PyErr_Clear();
        return;
    }
    struct op k = {.c = c, .kind = OP_RULE};
    if (enter_try(&k) != DONE)
        return;
    section(&k);
    leave(&k);
}

/* -- waiting ------------------------------------------------------------------------------- */

/* One bounded wait for a post, without the GIL: 1 if it consumed one, 0 when the step ends
 * (at `stop`, or early on a signal). */
static int wait_step(Core *c, int cls, double stop)
{
    sem_t *s = c->sem[cls];
    STEP(WAIT_STEP);
    int r = -1;
    if (c->poll_waits) {
        /* No timed wait (macOS): trywait with a monotonic back-off, 1 ms growing to 20 ms,
         * as CPython's multiprocessing does there. */
        double delay = 0.001;
        while ((r = sem_trywait(s)) != 0) {
            double left = stop - now();
            if (left <= 0)
                break;
            nap(delay < left ? delay : left);
            delay = delay * 2 < 0.02 ? delay * 2 : 0.02;
        }
    } else {
#if defined(HAVE_SEM_CLOCKWAIT)
        struct timespec ts = monotonic_ts(stop);
        r = sem_clockwait(s, CLOCK_MONOTONIC, &ts);
#elif defined(HAVE_SEM_TIMEDWAIT)
        struct timespec ts = realtime_ts(stop); /* a clock step stretches one step only */
        r = sem_timedwait(s, &ts);
#else
        while ((r = sem_trywait(s)) != 0 && now() < stop)
            nap(0.001);
#endif
    }
    if (r != 0)
        return 0;
    atomic_fetch_add_explicit(&woken, 1, memory_order_relaxed); /* (a statistic only) */
    STEP(WAIT_WOKEN);
    return 1;
}

/* A wait step ended without a post: is there anything for this waiter?  Loads only, no
 * lock, nothing scanned: an idle waiter costs its wake-up and this. */
static int look(struct op *o)
{
    struct page *p = o->c->pg;
    atomic_fetch_add_explicit(&looks, 1, memory_order_relaxed);
    uint64_t cnt = atomic_load(&p->w.counter);
    if (!atomic_load(&p->w.kick) && cnt <= MAX_VALUE && !can_proceed(o, cnt))
        return 0;
    atomic_fetch_add_explicit(&looks_locked, 1, memory_order_relaxed);
    return 1;
}

/* Run Python's signal handlers between steps (main thread only; no lock is held): DONE,
 * PYERR (a handler raised), or FORKED (a handler forked, and this is the child). */
static int between_steps(struct op *o)
{
    PyEval_RestoreThread(o->ts);
    int r = PyErr_CheckSignals();
    o->ts = PyEval_SaveThread();
    if (atomic_load(&fork_gen) != o->gen)
        return FORKED;
    return r < 0 ? PYERR : DONE;
}

/* Wait, in bounded steps, until a post comes, a look says go, or the deadline passes:
 * DONE (go back under the lock), PYERR or FORKED.
 *
 * A step ends on a STEP_GRID boundary at most one step away: the timers of idle waiters in
 * all processes then expire together, a batch per boundary, and a CPU that wakes from idle
 * for one serves the whole batch (timer wake-ups from idle are the dearest part of an idle
 * waiter's cost, dearer still under virtualisation).  A finer grid would batch less; a
 * coarser one would make longer bursts, each of which delays whatever the CPUs had to do. */
static int wait_post(struct op *o)
{
    double other = (double)atomic_load_explicit(&step_ns, memory_order_relaxed) * 1e-9;
    double step = (o->signals ? STEP_MAIN : other) - STEP_GRID;
    for (;;) {
        double t = now(), grid = ceil((t + step) / STEP_GRID) * STEP_GRID;
        double stop = grid < o->until ? grid : o->until;
        o->woke = wait_step(o->c, o->cls, stop);
        if (o->woke)
            return DONE;
        if (o->signals) {
            int r = between_steps(o);
            if (r != DONE)
                return r;
        }
        if (now() >= o->until || look(o))
            return DONE;
    }
}

/* Take the lock for the slow path, without the GIL, in steps (the main thread runs signal
 * handlers between them) until o->lock_until: DONE (held, repaired), BUSY, TIMEDOUT,
 * CORRUPT, LOCKFAIL, PYERR, FORKED. */
static int enter(struct op *o)
{
    int r = lock_try(o);
    if (r == BUSY && o->woke) /* (posts come after unlocks: a statistic of how often not) */
        atomic_fetch_add_explicit(&woken_busy, 1, memory_order_relaxed);
    if (r == BUSY)
        r = lock_yield(o, o->lock_until);
    while (r == BUSY) {
        double t = now();
        if (t >= o->lock_until)
            return o->until < 0 ? BUSY : TIMEDOUT;
        double stop = o->signals && t + STEP_MAIN < o->lock_until ? t + STEP_MAIN : o->lock_until;
        r = lock_wait(o, stop);
        if (r == BUSY && o->signals) {
            int s = between_steps(o);
            if (s != DONE)
                return s;
        }
    }
    if (r == DONE)
        after_taking(o);
    return r;
}

/* A registration whose call ends without the lock (a handler raised; the deadline passed
 * while a stopped peer holds the lock): account it now if the lock is free, else leave it
 * to this process's next section.  Until then it only causes extra posts. */
static void abandon(struct op *o)
{
    Core *c = o->c;
    o->kind = OP_RULE;
    if (enter_try(o) == DONE) {
        section(o);
        leave(o);
        return;
    }
    /* Settled later as an expired step (W - 1).  A post this wait consumed goes back first:
     * the count still has it, and another waiter may need it meanwhile. */
    if (o->woke)
        sem_post(c->sem[o->cls]);
    atomic_fetch_add(&c->abandoned[o->cls], 1);
    o->registered = 0;
}

/* Before a blocking normal-mode read sleeps, it watches the counter for a moment: an
 * answer often comes within microseconds (a ping-pong partner, a producer in a burst), and
 * seeing it saves the registration, the sleep and the wake-up.  The loads are relaxed:
 * only a hint, re-checked under the lock.  Never on one CPU (the writer could not run)
 * and never in semaphore mode (only the readers that can proceed should run).
 *
 * It keeps the CPU (PAUSE, no sched_yield): on a busy machine a yield hands the CPU to
 * any runnable task for up to its whole slice (sched_yield(2): the caller goes to the end
 * of the queue for its priority), and a read that yielded came back milliseconds after
 * its answer; a reader that sleeps instead is woken with the wake-up's preemption. */
static void spin_for_counter(struct op *o)
{
    _Atomic uint64_t *counter = &o->c->pg->w.counter;
    double end = now() + (double)atomic_load_explicit(&spin_ns, memory_order_relaxed) * 1e-9;
    if (o->until < end)
        end = o->until;
    while (!atomic_load_explicit(counter, memory_order_relaxed) && now() < end)
        for (int j = 0; j < 8; j++)
            cpu_relax();
}

/* The contended or blocking path, without the GIL.  `waiting`: the caller's section has
 * registered the call already, so it waits first. */
static int slow_path(struct op *o, int waiting)
{
    if (o->spin)
        spin_for_counter(o);
    for (;;) {
        int r;
        if (!waiting) {
            if ((r = enter(o)) != DONE)
                return r;
            r = section(o);
            leave(o);
            if (r != BLOCKED)
                return r;
        }
        waiting = 0;
        if ((r = wait_post(o)) != DONE)
            return r;
        if (o->until != INFINITY) /* a registered waiter waits for the lock until its deadline */
            o->lock_until = o->until;
    }
}

/* -- fork ---------------------------------------------------------------------------------- */

/* pthread_atfork handlers.  The list of cores is walked in the child, so no other thread
 * may be changing it at the fork. */
static void before_fork(void) { pthread_mutex_lock(&cores_lock); }
static void after_fork_parent(void) { pthread_mutex_unlock(&cores_lock); }

/* In the only thread of a new child, before any Python. */
static void after_fork_child(void)
{
    atomic_fetch_add(&fork_gen, 1);
    atomic_store(&main_ident, PyThread_get_thread_ident());
    for (Core *c = all_cores.next; c && c != &all_cores; c = c->next) {
        c->inflight = 0; /* the calls in flight were the parent's other threads' */
        pthread_mutex_init(&c->local, NULL); /* another thread may have held them at fork */
        pthread_mutex_init(&c->state, NULL);
    }
    pthread_mutex_init(&cores_lock, NULL);
}

static int open_private(Core *c);

/* A fork child uses its own private description (the inherited one is the parent's: its
 * byte locks and liveness bytes are the parent's) and claims a slot of its own. */
static int ensure_own(Core *c)
{
    unsigned long g = atomic_load(&fork_gen);
    if (__builtin_expect(atomic_load(&c->gen) == g, 1))
        return 0;
    pthread_mutex_lock(&c->state);
    if (atomic_load(&c->gen) == g) { /* (another thread of the child did it meanwhile) */
        pthread_mutex_unlock(&c->state);
        return 0;
    }
    if (c->priv >= 0) {
        close(c->priv); /* the parent's copy stays open, so its locks stay */
        c->priv = -1;
    }
    c->slot = -1;
    atomic_store(&c->abandoned[0], 0);
    atomic_store(&c->abandoned[1], 0);
    if (c->spare >= 0) { /* opened for us by the parent before the fork (prepare_fork) */
        c->priv = c->spare;
        c->spare = -1;
    } else if (open_private(c) != 0) {
        pthread_mutex_unlock(&c->state);
        return -1;
    }
    atomic_store(&c->gen, g);
    pthread_mutex_unlock(&c->state);
    return 0;
}

/* -- the operations, with the GIL ---------------------------------------------------------- */

/* Run `o` on the locked path: one try with the GIL held (the usual case: no wait), else the
 * slow path without it.  Returns what the call ends with. */
static int run(struct op *o)
{
    Core *c = o->c;
    if (ensure_own(c) != 0)
        return PYERR;
    o->cls = o->kind == OP_WRITE ? WRITER : READER;
    o->signals = is_main_thread();
    o->gen = atomic_load(&fork_gen);
    o->spin = o->spin && atomic_load_explicit(&spin_ns, memory_order_relaxed) > 0 &&
              !atomic_load_explicit(&c->pg->w.counter, memory_order_relaxed);
    if (o->lock_until < 0)
        o->lock_until = now() + PATIENCE; /* a non-blocking call waits for a held lock */
    int r = BUSY;
    if (!o->spin && (r = lock_spin(o)) == DONE) {
        after_taking(o);
        r = section(o);
        leave(o);
    }
    if (r == BUSY || r == BLOCKED) {
        o->ts = PyEval_SaveThread();
        r = slow_path(o, r == BLOCKED);
        if (r != DONE && r != FORKED && o->registered)
            abandon(o);
        PyEval_RestoreThread(o->ts);
        o->ts = NULL;
    }
    return r;
}

/* write(v): lock-free when the counter is > 0 and stays > 0, else a locked section. */
static int core_write(struct op *o)
{
    Core *c = o->c;
    struct page *p = c->pg;
    uint64_t v = o->v;
    o->kind = OP_WRITE;
    /* Lock-free: a write that finds the counter > 0 and leaves it > 0 is one CAS.  (A
     * write(0) takes the lock: it changes nothing, and repairs what a dead holder left.) */
    uint64_t cnt = atomic_load(&p->w.counter);
    while (cnt && v && cnt <= MAX_VALUE && v <= MAX_VALUE - cnt) {
        if (atomic_compare_exchange_weak(&p->w.counter, &cnt, cnt + v)) {
            STEP(WRITE_LOCKFREE);
            uint64_t wp = wp_load(c, READER);
            if (P_of(wp) < readers_ready(c, cnt + v, W_of(wp)))
                kick(c, KICK_READERS);
            return DONE;
        }
    }
    return run(o);
}

/* read(): lock-free for a semaphore read of a counter >= 2, else a locked section; the
 * value read in o->v. */
static int core_read(struct op *o)
{
    Core *c = o->c;
    struct page *p = c->pg;
    o->kind = OP_READ;
    if (c->semaphore) {
        uint64_t cnt = atomic_load(&p->w.counter);
        while (cnt >= 2 && cnt <= MAX_VALUE) {
            if (atomic_compare_exchange_weak(&p->w.counter, &cnt, cnt - 1)) {
                STEP(READ_LOCKFREE);
                uint64_t wp = wp_load(c, WRITER); /* the other half of the Dekker pair */
                if (P_of(wp) < W_of(wp))
                    kick(c, KICK_WRITERS);
                o->v = 1;
                return DONE;
            }
        }
    }
    o->spin = !c->semaphore && o->until != -1.0;
    return run(o);
}

/* Readiness is armed once a pollable fd is handed out anywhere (fileno(), fds, handle,
 * aread): until then no transition touches the pipe, since nobody can poll it.  Arming
 * waits for the lock at most PATIENCE (BlockingIOError past it: a stopped holder). */
static int core_arm(struct op *o)
{
    if (__builtin_expect(atomic_load(&o->c->pg->w.armed) != 0, 1))
        return DONE;
    o->kind = OP_ARM;
    o->until = INFINITY;
    o->lock_until = -1.0;
    return run(o);
}

/* -- signals at the end of a call ----------------------------------------------------------
 *
 * Python runs signal handlers between bytecodes, never inside a C call; when after a call
 * it checks for them depends on the CPython version (3.14 checks later after a keyword call
 * than 3.13), and an exception raised between a read's return and the caller's store would
 * lose the value read.  So a call that did its work runs the handlers itself, before it
 * returns (main thread only: PyErr_CheckSignals does nothing elsewhere):
 *   - a handler that raises makes the call raise, on every version;
 *   - a read gives its value back first (a write of it): a call that raises consumed
 *     nothing.  If the value no longer fits (writers filled the counter meanwhile) the read
 *     returns it after all, and the exception is raised again right after the call;
 *   - a write that committed stays committed: the exception comes from the call, the write
 *     stands, as if the signal had come just after it returned. */

#if PY_VERSION_HEX < 0x030C0000
static PyObject *PyErr_GetRaisedException(void)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v && tb)
        PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    return v;
}

static void PyErr_SetRaisedException(PyObject *exc)
{
    if (!exc)
        return;
    PyObject *tb = PyException_GetTraceback(exc);
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, tb);
}
#endif

static int raise_later(void *exc)
{
    PyErr_SetRaisedException((PyObject *)exc);
    return -1;
}

static int handlers_after(struct op *o, int r)
{
    if (r != DONE || PyErr_CheckSignals() == 0)
        return r;
    if (o->kind != OP_READ || !o->v)
        return PYERR;
    PyObject *exc = PyErr_GetRaisedException();
    struct op back = {.c = o->c, .v = o->v, .until = -1.0, .lock_until = -1.0};
    if (core_write(&back) == DONE) {
        PyErr_SetRaisedException(exc);
        return PYERR;
    }
    PyErr_Clear(); /* (what the give-back raised, if anything: the read stands) */
    if (Py_AddPendingCall(raise_later, exc) != 0) { /* (the queue is full: report it) */
        PyErr_SetRaisedException(exc);
        PyErr_WriteUnraisable((PyObject *)o->c);
    }
    return DONE;
}

/* -- module state, and the errors a call ends with ----------------------------------------- */

typedef struct {
    PyObject *state_error;     /* mpeventfd.StateError */
    PyTypeObject *core_type;
    PyTypeObject *handle_type;
} module_state;

static struct PyModuleDef module_def;

/* The module state behind a Core, a Handle or a subclass of one (EventFD). */
static module_state *state_of(PyTypeObject *tp)
{
    PyObject *m = PyType_GetModuleByDef(tp, &module_def);
    return m ? (module_state *)PyModule_GetState(m) : NULL;
}

static PyObject *state_error(PyTypeObject *tp)
{
    module_state *st = state_of(tp);
    PyErr_Clear(); /* (only a foreign subclass could fail the lookup) */
    return st ? st->state_error : PyExc_ValueError;
}

static PyObject *closed_error(void)
{
    set_oserror(EBADF, "Bad file descriptor: the EventFD is closed");
    return NULL;
}

/* Turn a call's result into the exception its caller sees (NULL). */
static PyObject *raise_result(Core *c, int r, int err)
{
    switch (r) {
    case AGAIN: set_oserror(EAGAIN, "Resource temporarily unavailable"); break;
    case TIMEDOUT:
        set_oserror(ETIMEDOUT, "timed out: the eventfd did not become ready in time");
        break;
    case BUSY:
        set_oserror(EAGAIN, "the eventfd's lock stayed held by another thread or process "
                            "(a stopped holder?) for longer than a non-blocking call waits");
        break;
    case NOSLOT: {
        char msg[160];
        snprintf(msg, sizeof msg, "too many processes wait on this eventfd: at most %d "
                 "processes may wait on one eventfd at once", NSLOTS);
        set_oserror(EUSERS, msg);
        break;
    }
    case FORKED:
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError,
                            "a signal handler forked during this eventfd call: the child does "
                            "not go on with it (the parent's call goes on)");
        break;
    case CORRUPT:
        PyErr_SetString(state_error(Py_TYPE(c)), "the shared state is out of range: the state "
                                                 "file was corrupted by another process");
        break;
    case LOCKFAIL:
        PyErr_Format(state_error(Py_TYPE(c)), "the eventfd's lock failed with %s (errno %d): "
                     "the shared page's mutex was damaged by another process",
                     strerror(err), err);
        break;
    }
    return NULL;
}

/* -- the Core's life: calls in flight, close, free ------------------------------------------ */

static void free_resources(Core *c)
{
    if (c->priv >= 0 && atomic_load(&c->gen) == atomic_load(&fork_gen)) {
        /* Leave the attached processes, then see whether any other one remains: if none
         * does, nobody else will liveness-test (lifecycle then leaves it to a reaper).
         * Of several processes detaching at once, the last to unlock sees no other. */
        byte_try(c, F_UNLCK, ATTACHED_BYTE);
        c->alone = !byte_held_elsewhere(c, ATTACHED_BYTE);
    }
    if (c->pg)
        munmap(c->pg, PAGE_BYTES);
    c->pg = NULL;
    for (int i = 0; i < 2; i++)
        if (c->sem[i]) {
            sem_close(c->sem[i]); /* never under a waiter: no call is in flight */
            c->sem[i] = NULL;
        }
    if (c->priv >= 0)
        close(c->priv);
    if (c->spare >= 0)
        close(c->spare);
    c->priv = c->spare = -1;
    for (int i = 0; i < 3; i++)
        if (c->fd[i] >= 0)
            close(c->fd[i]);
    c->fd[0] = c->fd[1] = c->fd[2] = -1;
    pthread_mutex_lock(&cores_lock);
    if (c->next) { /* off the list the fork child walks */
        c->prev->next = c->next;
        c->next->prev = c->prev;
        c->next = c->prev = NULL;
    }
    pthread_mutex_unlock(&cores_lock);
    atomic_store(&c->closed, 1);
    atomic_store(&c->freed, 1);
}

/* Free a closed core if no call is in flight; 1 if this call freed it.
 *
 *   a call (enter)                        the freer (under c->state)
 *   inflight += 1                         freed := 1   (a claim)
 *   load freed: 1 -> back out             load inflight: > 0 -> freed := 0, keep it
 *
 * With both orders seq_cst, one of the two sees the other: no call runs on a freed core,
 * and a core given up for a call in flight is freed when that call leaves. */
static int free_if_idle(Core *c)
{
    int now_free = 0;
    pthread_mutex_lock(&c->state);
    if (atomic_load(&c->closed) && !atomic_load(&c->freed)) {
        atomic_store(&c->freed, 1);
        if (FLIGHT_LOAD(c->inflight) == 0) {
            free_resources(c);
            now_free = 1;
        } else {
            atomic_store(&c->freed, 0);
        }
    }
    pthread_mutex_unlock(&c->state);
    return now_free;
}

/* After the last call out of a closed core: free it, then tell lifecycle (which
 * liveness-tests). */
static void release_after(Core *c)
{
    if (!atomic_load(&c->closed) || atomic_load(&c->freed) || !free_if_idle(c))
        return;
    PyObject *on_free = Py_XNewRef(c->on_free);
    if (on_free && on_free != Py_None) {
        PyObject *saved = PyErr_GetRaisedException();
        PyObject *r = PyObject_CallOneArg(on_free, (PyObject *)c);
        if (!r && PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
            PyErr_Clear(); /* a handler's Ctrl-C, which ran inside the callback: keep it */
            PyErr_SetInterrupt();
        } else if (!r) {
            PyErr_WriteUnraisable(on_free);
        }
        Py_XDECREF(r);
        PyErr_SetRaisedException(saved);
    }
    Py_XDECREF(on_free);
}

/* A call on the core begins: count it in flight, then look: -1 with EBADF if the core is
 * freed (or closed, unless `closed_ok`).  close() stores `closed` before it looks at the
 * count, and the freer claims `freed` before: see free_if_idle. */
static int enter_call(Core *c, int closed_ok)
{
    FLIGHT_ADD(c->inflight, 1);
    if (!atomic_load(&c->freed) && (closed_ok || !atomic_load(&c->closed)))
        return 0;
    if (FLIGHT_ADD(c->inflight, -1) == 0)
        release_after(c);
    closed_error();
    return -1;
}

/* The call ends.  FORKED: a signal handler forked and this is the child, whose count of
 * calls in flight started again from zero. */
static void leave_call(Core *c, int r)
{
    if (r != FORKED && FLIGHT_ADD(c->inflight, -1) == 0)
        release_after(c);
}

/* A new private description, with the attached mark on it; -1 with an exception set. */
static int open_description(Core *c)
{
    struct stat st;
    int fd;
    uint64_t dev, ino;
    if (c->carrier == CARRIER_PIPE) {
        /* Linux opens a FIFO read-write through /proc (fifo(7)); the description is ours,
         * non-blocking for good, and takes OFD byte locks like a file. */
        char path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", c->fd[1]);
        fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
        dev = c->pg->h.pipe_dev;
        ino = c->pg->h.pipe_ino;
    } else {
        fd = open(c->file_path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
        dev = c->pg->h.file_dev;
        ino = c->pg->h.file_ino;
    }
    if (fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    /* fileno() may have been closed or replaced by the user, the lock file by anyone:
     * never lock some other inode. */
    if (fstat(fd, &st) != 0 || (uint64_t)st.st_dev != dev || (uint64_t)st.st_ino != ino) {
        close(fd);
        set_oserror(EBADF, "the eventfd's fileno() or lock file was closed or replaced");
        return -1;
    }
    struct flock fl = one_byte(F_RDLCK, ATTACHED_BYTE); /* shared: "attached here" */
    fcntl(fd, c->carrier == CARRIER_PIPE ? OFD_SETLK : F_SETLK, &fl);
    return fd;
}

static int open_private(Core *c)
{
    c->priv = open_description(c);
    return c->priv < 0 ? -1 : 0;
}

/* Validate a page's head (from pread, or the mapping): range-check every field (I14). */
static int check_head(struct head *hd, off_t file_size, PyObject *error)
{
    const struct header *h = &hd->h;
    struct words *w = &hd->w;
    const char *why = NULL;
    if (file_size != (off_t)PAGE_BYTES)
        why = "the state file has the wrong size";
    else if (h->magic != MAGIC)
        why = "not an mpeventfd state file of this layout (bad magic)";
    else if (h->version != VERSION)
        why = "the state layout is of another version";
    else if (h->size != PAGE_BYTES || h->nslots != NSLOTS)
        why = "the state header records a foreign size or slot count";
    else if (h->semaphore > 1 || atomic_load(&w->nonblock) > 1 || atomic_load(&w->dirty) > 1 ||
             atomic_load(&w->armed) > 1 ||
             atomic_load(&w->kick) > (KICK_READERS | KICK_WRITERS))
        why = "a state header flag is out of range";
    else if (atomic_load(&w->counter) > MAX_VALUE)
        why = "the state header's counter is out of range";
    else if (atomic_load(&w->hwm) > NSLOTS)
        why = "the state header's slot count is out of range";
    else if ((h->mutex_kind != MUTEX_ROBUST && h->mutex_kind != MUTEX_BYTE) ||
             (h->carrier != CARRIER_PIPE && h->carrier != CARRIER_FILE))
        why = "the state header names an unknown lock kind";
    if (why) {
        PyErr_SetString(error, why);
        return -1;
    }
    /* A robust mutex is laid out by the C library: glibc's and musl's differ (one's lock
     * word is the other's type field), and so do pointer widths.  Two processes built
     * against different ones would each lock the other out for good (a musllinux and a
     * manylinux wheel can share /dev/shm through --ipc=host, or a shared volume). */
    if (h->mutex_kind == MUTEX_ROBUST &&
        (h->libc != LIBC || h->ptr_bits != sizeof(void *) * 8 ||
         h->mutex_size != sizeof(pthread_mutex_t))) {
        uint64_t theirs = h->libc < sizeof libc_names / sizeof *libc_names ? h->libc : 0;
        PyErr_Format(error,
                     "this eventfd's robust mutex was laid out by %s (%llu-bit, a %llu-byte "
                     "pthread_mutex_t); this process uses %s (%d-bit, %d bytes): only "
                     "processes of the same C library can share it",
                     libc_names[theirs], (unsigned long long)h->ptr_bits,
                     (unsigned long long)h->mutex_size, libc_names[LIBC],
                     (int)(sizeof(void *) * 8), (int)sizeof(pthread_mutex_t));
        return -1;
    }
    return 0;
}

/* Core(state_fd, rfd, wfd, sem_r, sem_w, lock_path, poll_waits): attach to a state file
 * (read_header validated it).  On success the three fds belong to the core; on failure
 * they are the caller's, untouched. */
static PyObject *core_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    int sfd, rfd, wfd, poll_waits;
    const char *names[2], *lock_path;
    struct stat st;
    if (kw && PyDict_GET_SIZE(kw))
        return PyErr_Format(PyExc_TypeError, "Core() takes positional arguments only");
    if (!PyArg_ParseTuple(args, "iiisszp", &sfd, &rfd, &wfd, &names[0], &names[1],
                          &lock_path, &poll_waits))
        return NULL;
    Core *c = (Core *)type->tp_alloc(type, 0);
    if (!c)
        return NULL;
    c->fd[0] = c->fd[1] = c->fd[2] = c->priv = c->spare = c->slot = -1;
    atomic_store(&c->closed, 1); /* until everything is in place */
    atomic_store(&c->freed, 1);
    pthread_mutex_init(&c->local, NULL);
    pthread_mutex_init(&c->state, NULL);
    PyObject *error = state_error(type);
    if (fstat(sfd, &st) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    void *m = mmap(NULL, PAGE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    if (m == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    c->pg = m;
    if (check_head((struct head *)c->pg, st.st_size, error) != 0)
        goto fail;
    if ((c->pg->h.carrier == CARRIER_FILE) != (lock_path != NULL)) {
        PyErr_SetString(error, "the lock file and the header disagree");
        goto fail;
    }
#ifndef HAVE_ROBUST_MUTEX
    if (c->pg->h.mutex_kind == MUTEX_ROBUST) {
        PyErr_SetString(error, "this eventfd uses a robust mutex, which this build lacks");
        goto fail;
    }
#endif
    c->semaphore = (int)c->pg->h.semaphore;
    c->mutex_kind = (int)c->pg->h.mutex_kind;
    c->carrier = (int)c->pg->h.carrier;
    c->poll_waits = poll_waits;
    if (lock_path) {
        if (!(c->file_path = PyMem_RawMalloc(strlen(lock_path) + 1))) {
            PyErr_NoMemory();
            goto fail;
        }
        strcpy(c->file_path, lock_path);
    }
    for (int i = 0; i < 2; i++) {
        c->sem[i] = sem_open(names[i], 0); /* posix_ipc created them; never create here */
        if (c->sem[i] == SEM_FAILED) {
            c->sem[i] = NULL;
            if (errno == ENOENT)
                PyErr_Format(PyExc_FileNotFoundError,
                             "[Errno %d] semaphore %s is missing: something outside mpeventfd "
                             "removed it (e.g. systemd RemoveIPC); refusing to re-create it",
                             ENOENT, names[i]);
            else
                PyErr_SetFromErrnoWithFilename(PyExc_OSError, names[i]);
            goto fail;
        }
    }
    c->fd[1] = rfd; /* (open_private reopens the pipe through its read end) */
    if (open_private(c) != 0) {
        c->fd[1] = -1;
        goto fail;
    }
    c->fd[0] = sfd;
    c->fd[2] = wfd;
    atomic_store(&c->gen, atomic_load(&fork_gen));
    atomic_store(&c->closed, 0);
    atomic_store(&c->freed, 0);
    pthread_mutex_lock(&cores_lock);
    c->next = all_cores.next;
    c->prev = &all_cores;
    all_cores.next->prev = c;
    all_cores.next = c;
    pthread_mutex_unlock(&cores_lock);
    return (PyObject *)c;
fail:
    free_resources(c); /* the mapping, semaphores, private fd: none of the caller's fds */
    Py_DECREF(c);
    return NULL;
}

static void core_dealloc(Core *c)
{
    /* Freed by close(); a core dropped without it still must not leak.  No call can be in
     * flight: each holds a reference. */
    PyTypeObject *tp = Py_TYPE(c);
    if (!atomic_load(&c->freed))
        free_resources(c);
    Py_CLEAR(c->on_free);
    PyMem_RawFree(c->file_path);
    pthread_mutex_destroy(&c->local);
    pthread_mutex_destroy(&c->state);
    tp->tp_free((PyObject *)c);
    Py_DECREF(tp); /* (a heap type's instances hold a reference to it) */
}

/* -- argument conversion ------------------------------------------------------------------- */

/* timeout -> until: -1 never waits for the counter (0), INFINITY waits for ever (inf), else
 * a monotonic deadline; NAN for None.  Argument conversion runs before the handle's core is
 * looked at: __index__ or __float__ may run Python code, which may close the handle. */
static int convert_timeout(PyObject *timeout, double *until)
{
    if (timeout == NULL || timeout == Py_None) {
        *until = NAN; /* the blocking mode decides, once the core is in hand (follow_mode) */
        return 0;
    }
    if (!PyFloat_Check(timeout) && !PyLong_Check(timeout)) {
        PyErr_Format(PyExc_TypeError, "timeout must be a number or None, not %.100s",
                     Py_TYPE(timeout)->tp_name);
        return -1;
    }
    double t = PyFloat_AsDouble(timeout);
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    if (isnan(t) || t < 0) {
        PyErr_SetString(PyExc_ValueError, "timeout must be a non-negative number or None");
        return -1;
    }
    *until = t == 0 ? -1.0 : t >= 1e12 ? INFINITY : now() + t; /* (1e12 s: for ever) */
    return 0;
}

/* timeout=None follows the blocking mode, read once at entry as the kernel reads
 * O_NONBLOCK (relaxed: a mode change races with calls in flight anyway, as on Linux). */
static double follow_mode(Core *c, double until)
{
    if (!isnan(until))
        return until;
    return atomic_load_explicit(&c->pg->w.nonblock, memory_order_relaxed) ? -1.0 : INFINITY;
}

/* The value of write(): an int, or anything with __index__ (bool too, as os.eventfd_write). */
static int convert_value(PyObject *obj, uint64_t *v)
{
    PyObject *n;
    if (PyLong_CheckExact(obj))
        n = Py_NewRef(obj);
    else if (PyIndex_Check(obj)) {
        if (!(n = PyNumber_Index(obj)))
            return -1;
    } else {
        PyErr_Format(PyExc_TypeError, "value must be an int, not %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long x = PyLong_AsUnsignedLongLong(n);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyObject *zero = PyLong_FromLong(0);
        int negative = zero ? PyObject_RichCompareBool(n, zero, Py_LT) : -1;
        Py_XDECREF(zero);
        Py_DECREF(n);
        if (negative > 0)
            PyErr_SetString(PyExc_ValueError, "value must be >= 0");
        else if (negative == 0)
            PyErr_SetString(PyExc_OverflowError, "value must be < 2**64");
        return -1;
    }
    Py_DECREF(n);
    if (x > MAX_VALUE) { /* the kernel's overflow marker: EINVAL, before the room check */
        set_oserror(EINVAL, "Invalid argument: 2**64 - 1 cannot be written");
        return -1;
    }
    *v = x;
    return 0;
}

/* -- Core methods: the seam that lifecycle and the public class use ------------------------ */

static PyObject *core_peek(Core *c, PyObject *unused)
{
    (void)unused;
    if (enter_call(c, 1) != 0)
        return NULL;
    uint64_t v = atomic_load(&c->pg->w.counter);
    leave_call(c, DONE);
    if (v > MAX_VALUE)
        return raise_result(c, CORRUPT, 0);
    return PyLong_FromUnsignedLongLong(v);
}

/* close(): mark closed; free now unless calls are in flight (the last one out frees).
 * True if freed now (or before).  Never waits for another thread. */
static PyObject *core_close(Core *c, PyObject *unused)
{
    (void)unused;
    atomic_store(&c->closed, 1);
    if (atomic_load(&c->freed))
        Py_RETURN_TRUE;
    return PyBool_FromLong(free_if_idle(c));
}

/* own(): in a fork child, take a private description (and an attached mark) of our own
 * now, rather than at the first locked call: the parent must see us attached. */
static PyObject *core_own(Core *c, PyObject *unused)
{
    (void)unused;
    if (enter_call(c, 1) != 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    int r = ensure_own(c);
    leave_call(c, DONE);
    if (r != 0)
        return NULL;
    Py_RETURN_NONE;
}

/* prepare_fork() / after_fork_parent(): around os.fork in the parent.  With OFD locks the
 * child is attached from its first instant: it inherits a description (with the attached
 * mark) that the parent opened for it and then lets go of.  (Classic fcntl locks are not
 * inherited, and closing any fd of the lock file would drop the parent's: not there.) */
static PyObject *core_prepare_fork(Core *c, PyObject *unused)
{
    (void)unused;
    if (enter_call(c, 1) != 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    pthread_mutex_lock(&c->state);
    if (c->carrier == CARRIER_PIPE && c->spare < 0 &&
        atomic_load(&c->gen) == atomic_load(&fork_gen) && (c->spare = open_description(c)) < 0)
        PyErr_Clear(); /* (the child then opens its own, a moment later) */
    pthread_mutex_unlock(&c->state);
    leave_call(c, DONE);
    Py_RETURN_NONE;
}

static PyObject *core_after_fork_parent(Core *c, PyObject *unused)
{
    (void)unused;
    pthread_mutex_lock(&c->state);
    if (c->spare >= 0)
        close(c->spare); /* the child's copy keeps the description and its mark */
    c->spare = -1;
    pthread_mutex_unlock(&c->state);
    Py_RETURN_NONE;
}

/* reopen(): a closed core that calls in flight still keep is wanted again (an attach). */
static PyObject *core_reopen(Core *c, PyObject *unused)
{
    (void)unused;
    int alive;
    pthread_mutex_lock(&c->state);
    alive = !atomic_load(&c->freed);
    if (alive)
        atomic_store(&c->closed, 0);
    pthread_mutex_unlock(&c->state);
    return PyBool_FromLong(alive);
}

/* For asyncio: a read that never waits for the counter, and for the lock about
 * AIO_PATIENCE.  Returns the value read, or 0 if the lock stayed busy; BlockingIOError when
 * the counter is 0.  A live holder keeps the lock for a microsecond, but the aread calling
 * this has often just been woken by that holder's pipe byte, which goes in before its
 * commit: the wake-up tends to preempt the holder inside its section.  Sleeping on the lock
 * (or yielding the CPU to its holder, lock_yield) gives the holder its CPU back; returning
 * "busy" would leave the event loop to poll a readable pipe until the scheduler's next tick.
 * Once a wait has timed out (a stopped holder), later calls of this process try once only
 * until one gets the lock: tasks that each waited 1 ms would stall the loop for as many
 * milliseconds as there are tasks. */
static PyObject *core_try_read(Core *c, PyObject *unused)
{
    (void)unused;
    if (enter_call(c, 0) != 0)
        return NULL;
    int stuck = atomic_load_explicit(&c->stuck, memory_order_relaxed); /* (a hint) */
    struct op o = {.c = c, .until = -1.0, .lock_until = stuck ? 0.0 : now() + AIO_PATIENCE};
    int r = handlers_after(&o, core_read(&o));
    atomic_store_explicit(&c->stuck, r == BUSY, memory_order_relaxed);
    atomic_fetch_add_explicit(&c->try_reads, 1, memory_order_relaxed);
    if (r == BUSY && !stuck)
        atomic_fetch_add_explicit(&c->try_read_stalls, 1, memory_order_relaxed);
    leave_call(c, r);
    if (r == BUSY)
        return PyLong_FromLong(0);
    if (r != DONE)
        return raise_result(c, r, o.err);
    return PyLong_FromUnsignedLongLong(o.v);
}

/* try_write(value): the same for a write: True, False if the lock was busy, or raises.
 * A write that commits lock-free never waits for the lock: its post is kicked (post_rule). */
static PyObject *core_try_write(Core *c, PyObject *value)
{
    uint64_t v;
    if (convert_value(value, &v) != 0) /* (first: it may run Python code) */
        return NULL;
    if (enter_call(c, 0) != 0)
        return NULL;
    struct op o = {.c = c, .v = v, .until = -1.0, .lock_until = 0.0};
    int r = handlers_after(&o, core_write(&o));
    leave_call(c, r);
    if (r == BUSY)
        Py_RETURN_FALSE;
    if (r != DONE)
        return raise_result(c, r, o.err);
    Py_RETURN_TRUE;
}

static PyObject *core_arm_method(Core *c, PyObject *unused)
{
    (void)unused;
    if (enter_call(c, 1) != 0)
        return NULL;
    struct op o = {.c = c};
    int r = core_arm(&o);
    leave_call(c, r);
    if (r != DONE)
        return raise_result(c, r, o.err);
    Py_RETURN_NONE;
}

static PyObject *core_stats(Core *c, PyObject *unused)
{
    (void)unused;
    if (enter_call(c, 1) != 0)
        return NULL;
    struct page *p = c->pg;
    int sv[2] = {-1, -1};
#ifdef HAVE_SEM_GETVALUE
    sem_getvalue(c->sem[0], &sv[0]);
    sem_getvalue(c->sem[1], &sv[1]);
#endif
    uint64_t wr = wp_load(c, READER), ww = wp_load(c, WRITER);
    PyObject *d = Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsisisi}",
        "counter", (unsigned long long)atomic_load(&p->w.counter),
        "dirty", (unsigned long long)atomic_load(&p->w.dirty),
        "armed", (unsigned long long)atomic_load(&p->w.armed),
        "waiting_r", (unsigned long long)W_of(wr), "posted_r", (unsigned long long)P_of(wr),
        "waiting_w", (unsigned long long)W_of(ww), "posted_w", (unsigned long long)P_of(ww),
        "kick", (unsigned long long)atomic_load(&p->w.kick),
        "hwm", (unsigned long long)atomic_load(&p->w.hwm),
        "repairs", (unsigned long long)atomic_load(&p->w.repairs),
        "abandoned",
        (unsigned long long)(atomic_load(&c->abandoned[0]) + atomic_load(&c->abandoned[1])),
        "woken", (unsigned long long)atomic_load(&woken),
        "woken_busy", (unsigned long long)atomic_load(&woken_busy),
        "looks", (unsigned long long)atomic_load(&looks),
        "looks_locked", (unsigned long long)atomic_load(&looks_locked),
        "try_reads", (unsigned long long)atomic_load(&c->try_reads),
        "try_read_stalls", (unsigned long long)atomic_load(&c->try_read_stalls),
        "slot", c->slot, "sem_r", sv[0], "sem_w", sv[1]);
    leave_call(c, DONE);
    return d;
}

static PyObject *core_get_fds(Core *c, void *unused)
{
    (void)unused;
    if (enter_call(c, 1) != 0)
        return NULL;
    PyObject *t = Py_BuildValue("(iii)", c->fd[0], c->fd[1], c->fd[2]);
    leave_call(c, DONE);
    return t;
}

static PyObject *core_get_nonblocking(Core *c, void *unused)
{
    (void)unused;
    if (enter_call(c, 1) != 0)
        return NULL;
    long b = (long)atomic_load(&c->pg->w.nonblock);
    leave_call(c, DONE);
    return PyBool_FromLong(b);
}

static int core_set_nonblocking(Core *c, PyObject *value, void *unused)
{
    (void)unused;
    int b = value ? PyObject_IsTrue(value) : -1; /* (first: it may run Python code) */
    if (b < 0)
        return -1;
    if (enter_call(c, 1) != 0)
        return -1;
    atomic_store(&c->pg->w.nonblock, (uint64_t)b); /* one store, seen by every process */
    leave_call(c, DONE);
    return 0;
}

static PyObject *core_get_ident(Core *c, void *unused)
{
    (void)unused;
    if (enter_call(c, 1) != 0)
        return NULL;
    PyObject *id = PyBytes_FromStringAndSize((const char *)c->pg->h.id, 16);
    leave_call(c, DONE);
    return id;
}

static PyObject *core_get_closed(Core *c, void *unused)
{
    (void)unused;
    return PyBool_FromLong(atomic_load(&c->closed));
}

static PyObject *core_get_freed(Core *c, void *unused)
{
    (void)unused;
    return PyBool_FromLong(atomic_load(&c->freed));
}

static PyObject *core_get_semaphore(Core *c, void *unused)
{
    (void)unused;
    return PyBool_FromLong(c->semaphore);
}

static PyObject *core_get_alone(Core *c, void *unused)
{
    (void)unused;
    return PyBool_FromLong(c->alone);
}

static PyObject *core_get_saw_death(Core *c, void *unused)
{
    (void)unused;
    return PyBool_FromLong(atomic_load(&c->saw_death));
}

static PyObject *core_get_on_free(Core *c, void *unused)
{
    (void)unused;
    return Py_NewRef(c->on_free ? c->on_free : Py_None);
}

/* Set once, by lifecycle, before the core is shared: it is read without a lock. */
static int core_set_on_free(Core *c, PyObject *value, void *unused)
{
    (void)unused;
    if (c->on_free == value)
        return 0; /* (a revived core registers again) */
    if (c->on_free) {
        PyErr_SetString(PyExc_ValueError, "on_free is set once");
        return -1;
    }
    c->on_free = Py_XNewRef(value);
    return 0;
}

static PyMethodDef core_methods[] = {
    {"peek", (PyCFunction)core_peek, METH_NOARGS, "The counter: one load, nothing consumed."},
    {"close", (PyCFunction)core_close, METH_NOARGS,
     "Mark closed; free now (True) unless calls are in flight (the last one out frees)."},
    {"reopen", (PyCFunction)core_reopen, METH_NOARGS, "Use a closed, not yet freed core again."},
    {"own", (PyCFunction)core_own, METH_NOARGS, "Fork child: a private description of our own."},
    {"prepare_fork", (PyCFunction)core_prepare_fork, METH_NOARGS,
     "Before os.fork: open the child's private description."},
    {"after_fork_parent", (PyCFunction)core_after_fork_parent, METH_NOARGS,
     "After os.fork, in the parent: let go of the child's description."},
    {"try_read", (PyCFunction)core_try_read, METH_NOARGS,
     "A read that waits for the lock about 1 ms (once per stalled holder): the value, 0 if "
     "it stayed busy, or BlockingIOError."},
    {"try_write", (PyCFunction)core_try_write, METH_O,
     "A write that never waits: True, False if the lock was busy, or BlockingIOError."},
    {"arm", (PyCFunction)core_arm_method, METH_NOARGS,
     "Arm readiness for good: a pollable fd is being handed out."},
    {"stats", (PyCFunction)core_stats, METH_NOARGS, "The shared accounting words (tests, ls)."},
    {NULL}};

static PyGetSetDef core_getset[] = {
    {"fds", (getter)core_get_fds, NULL, "(state fd, read end, write end): they travel.", NULL},
    {"nonblocking", (getter)core_get_nonblocking, (setter)core_set_nonblocking,
     "The shared blocking mode (O_NONBLOCK of the one description).", NULL},
    {"ident", (getter)core_get_ident, NULL, "The 16-byte id.", NULL},
    {"closed", (getter)core_get_closed, NULL, "close() was called.", NULL},
    {"freed", (getter)core_get_freed, NULL, "Every resource is released.", NULL},
    {"semaphore", (getter)core_get_semaphore, NULL, "EFD_SEMAPHORE, fixed at creation.", NULL},
    {"alone", (getter)core_get_alone, NULL,
     "Freed with no other process attached: none will liveness-test after us.", NULL},
    {"saw_death", (getter)core_get_saw_death, NULL,
     "This process repaired after a holder died: that peer may still be exiting.", NULL},
    {"on_free", (getter)core_get_on_free, (setter)core_set_on_free,
     "Called with the core once close() and the last call in flight have freed it.", NULL},
    {NULL}};

static PyType_Slot core_slots[] = {
    {Py_tp_dealloc, core_dealloc},
    {Py_tp_doc, "One eventfd as attached in this process (one per process and eventfd)."},
    {Py_tp_methods, core_methods},
    {Py_tp_getset, core_getset},
    {Py_tp_new, core_new},
    {0, NULL}};

static PyType_Spec core_spec = {
    "mpeventfd._core.Core", sizeof(Core), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    core_slots};

/* -- Handle: the base of the public EventFD, its hot methods in C -------------------------- */

typedef struct {
    PyObject_HEAD
    Core *core;         /* set once, before the handle is shared, and kept until dealloc: a
                         * call reads it without a lock (free-threaded, and in a fork child
                         * whose parent's other threads held locks at the fork) */
    _Atomic int closed; /* the handle let go of the core (close(), _detach()) */
} Handle;

/* The handle's live core, with the call counted in flight (done() ends it), or NULL with
 * EBADF.  The handle keeps its core for its whole life, so no reference is needed. */
static Core *live(Handle *h)
{
    Core *c = h->core;
    if (!c || atomic_load(&h->closed))
        return (Core *)closed_error();
    return enter_call(c, 0) == 0 ? c : NULL;
}

static void done(Core *c, int r) { leave_call(c, r); }

/* Fast argument parsing for (value=1, timeout=None) and (timeout=None). */
static int parse(const char *fn, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                 const char *const *names, int n, PyObject **out)
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fn, n, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        out[i] = args[i];
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *k = PyTuple_GET_ITEM(kwnames, i);
        int j = 0;
        while (j < n && PyUnicode_CompareWithASCIIString(k, names[j]) != 0)
            j++;
        if (j == n || out[j]) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected or repeated argument %R", fn, k);
            return -1;
        }
        out[j] = args[nargs + i];
    }
    return 0;
}

static PyObject *handle_write(Handle *h, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"value", "timeout"};
    PyObject *a[2] = {NULL, NULL};
    uint64_t v = 1;
    double until;
    if ((nargs > 1 || kw) && parse("write", args, nargs, kw, names, 2, a) != 0)
        return NULL;
    if (nargs == 1)
        a[0] = args[0];
    if ((a[0] && convert_value(a[0], &v) != 0) || convert_timeout(a[1], &until) != 0)
        return NULL;
    Core *c = live(h);
    if (!c)
        return NULL;
    until = follow_mode(c, until);
    struct op o = {.c = c, .v = v, .until = until, .lock_until = until};
    int r = handlers_after(&o, core_write(&o));
    PyObject *result = r == DONE ? Py_NewRef(Py_None) : raise_result(c, r, o.err);
    done(c, r);
    return result;
}

static PyObject *handle_read(Handle *h, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"timeout"};
    PyObject *timeout = NULL;
    double until;
    if (parse("read", args, nargs, kw, names, 1, &timeout) != 0 ||
        convert_timeout(timeout, &until) != 0)
        return NULL;
    Core *c = live(h);
    if (!c)
        return NULL;
    until = follow_mode(c, until);
    struct op o = {.c = c, .until = until, .lock_until = until};
    int r = handlers_after(&o, core_read(&o));
    PyObject *result = r == DONE ? PyLong_FromUnsignedLongLong(o.v) : raise_result(c, r, o.err);
    done(c, r);
    return result;
}

static PyObject *handle_peek(Handle *h, PyObject *unused)
{
    Core *c = live(h);
    if (!c)
        return NULL;
    PyObject *v = core_peek(c, unused);
    done(c, DONE);
    return v;
}

static PyObject *handle_fileno(Handle *h, PyObject *unused)
{
    (void)unused;
    Core *c = live(h);
    if (!c)
        return NULL;
    struct op o = {.c = c};
    int r = core_arm(&o), fd = c->fd[1];
    PyObject *result = r == DONE ? PyLong_FromLong(fd) : raise_result(c, r, o.err);
    done(c, r);
    return result;
}

static void handle_dealloc(Handle *h)
{
    PyTypeObject *tp = Py_TYPE(h);
    Py_CLEAR(h->core);
    tp->tp_free((PyObject *)h);
    Py_DECREF(tp); /* (a heap type, or a subclass whose dealloc leaves it to us) */
}

static PyObject *handle_get_core(Handle *h, void *unused)
{
    (void)unused;
    Core *c = h->core;
    return Py_NewRef(c && !atomic_load(&h->closed) ? (PyObject *)c : Py_None);
}

/* _core = a Core: attach (once, before the handle is shared); _core = None: close. */
static int handle_set_core(Handle *h, PyObject *value, void *unused)
{
    (void)unused;
    module_state *st = state_of(Py_TYPE(h));
    if (!st)
        return -1;
    if (!value || value == Py_None) {
        atomic_store(&h->closed, 1);
        return 0;
    }
    if (!PyObject_TypeCheck(value, st->core_type)) {
        PyErr_SetString(PyExc_TypeError, "_core must be a Core or None");
        return -1;
    }
    if (h->core) {
        PyErr_SetString(PyExc_ValueError, "a handle's core is set once");
        return -1;
    }
    h->core = (Core *)Py_NewRef(value);
    return 0;
}

/* _detach(): close the handle; its core if this call closed it (exactly one caller gets
 * it, whatever the threads), else None. */
static PyObject *handle_detach(Handle *h, PyObject *unused)
{
    (void)unused;
    if (h->core && atomic_exchange(&h->closed, 1) == 0)
        return Py_NewRef((PyObject *)h->core);
    Py_RETURN_NONE;
}

static PyMethodDef handle_methods[] = {
    {"read", (PyCFunction)(void (*)(void))handle_read, METH_FASTCALL | METH_KEYWORDS,
     "read(timeout=None)\n--\n\n"
     "Read the counter: all of it (resetting it to 0), or 1 in semaphore mode.\n\n"
     "Args:\n"
     "    timeout: None follows the blocking mode; 0 never waits; > 0 waits at most that\n"
     "        many seconds (monotonic), for the counter and for the lock; inf for ever.\n\n"
     "Returns:\n    The value read, 1 <= value <= MAX_VALUE.\n\n"
     "Raises:\n"
     "    BlockingIOError: the counter is 0 and the call may not wait.\n"
     "    TimeoutError: the timeout expired; nothing was consumed.\n"
     "    OSError: EBADF if the handle is closed; EUSERS if 1024 other processes wait.\n"},
    {"write", (PyCFunction)(void (*)(void))handle_write, METH_FASTCALL | METH_KEYWORDS,
     "write(value=1, timeout=None)\n--\n\n"
     "Add value to the counter.\n\n"
     "A write that would take the counter past MAX_VALUE waits for room (or raises in\n"
     "non-blocking mode); there is never a partial add.  write(0) always succeeds.\n\n"
     "Args:\n"
     "    value: 0 <= value <= MAX_VALUE; bool is accepted, as by os.eventfd_write.\n"
     "    timeout: as for read().\n\n"
     "Raises:\n"
     "    TypeError: value is not an int.\n"
     "    ValueError: value is negative.\n"
     "    OverflowError: value >= 2**64.\n"
     "    OSError: EINVAL for value == 2**64 - 1 (checked before room, as on Linux);\n"
     "        EBADF if closed.\n"
     "    BlockingIOError: no room and the call may not wait.\n"
     "    TimeoutError: no room before the timeout; nothing was added.\n"},
    {"peek", (PyCFunction)handle_peek, METH_NOARGS,
     "peek()\n--\n\nReturn the counter without consuming anything (like fdinfo's "
     "eventfd-count)."},
    {"fileno", (PyCFunction)handle_fileno, METH_NOARGS,
     "fileno()\n--\n\nThe notifier pipe's read end: readable exactly while the counter is\n"
     "> 0.  It is a pipe, not an eventfd: it never reports POLLOUT, and reading it directly\n"
     "bypasses the counter; use read() to consume."},
    {"_detach", (PyCFunction)handle_detach, METH_NOARGS,
     "Close the handle; its core if this call closed it, else None."},
    {NULL}};

static PyGetSetDef handle_getset[] = {
    {"_core", (getter)handle_get_core, (setter)handle_set_core, "The attached core.", NULL},
    {NULL}};

static PyType_Slot handle_slots[] = {
    {Py_tp_dealloc, handle_dealloc},
    {Py_tp_doc, "Base of mpeventfd.EventFD: the operations that are one C call each."},
    {Py_tp_methods, handle_methods},
    {Py_tp_getset, handle_getset},
    {Py_tp_new, PyType_GenericNew},
    {0, NULL}};

static PyType_Spec handle_spec = {
    "mpeventfd._core.Handle", sizeof(Handle), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_IMMUTABLETYPE, handle_slots};

/* -- module functions ---------------------------------------------------------------------- */

/* init_page(fd, id, semaphore, nonblock, initval, mutex_kind, carrier, pipe_dev, pipe_ino):
 * write a fresh header into a zeroed state file; the magic goes last, with release order,
 * so a half-written header never validates.  The identities of the semaphores and of the
 * lock file, made later, are written with set_identity(). */
static PyObject *mod_init_page(PyObject *mod, PyObject *args)
{
    (void)mod;
    int fd, semaphore, nonblock, mutex_kind, carrier, err = 0;
    Py_buffer id;
    unsigned long long initval, pipe_dev, pipe_ino;
    if (!PyArg_ParseTuple(args, "iy*ppKiiKK", &fd, &id, &semaphore, &nonblock, &initval,
                          &mutex_kind, &carrier, &pipe_dev, &pipe_ino))
        return NULL;
    if (id.len != 16 || initval > MAX_VALUE ||
        (mutex_kind != MUTEX_ROBUST && mutex_kind != MUTEX_BYTE) ||
        (carrier != CARRIER_PIPE && carrier != CARRIER_FILE)) {
        PyBuffer_Release(&id);
        return PyErr_Format(PyExc_ValueError, "bad init_page arguments");
    }
    struct page *p = mmap(NULL, PAGE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        PyBuffer_Release(&id);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    memcpy(p->h.id, id.buf, 16);
    PyBuffer_Release(&id);
    p->h.version = VERSION;
    p->h.size = PAGE_BYTES;
    p->h.semaphore = (uint64_t)semaphore;
    p->h.mutex_kind = (uint64_t)mutex_kind;
    p->h.carrier = (uint64_t)carrier;
    p->h.creator = (uint64_t)getpid();
    p->h.pipe_dev = pipe_dev;
    p->h.pipe_ino = pipe_ino;
    p->h.nslots = NSLOTS;
    p->h.libc = LIBC;
    p->h.ptr_bits = sizeof(void *) * 8;
    p->h.mutex_size = sizeof(pthread_mutex_t);
    atomic_store(&p->w.counter, initval);
    atomic_store(&p->w.nonblock, (uint64_t)nonblock);
    if (mutex_kind == MUTEX_ROBUST) {
#ifdef HAVE_ROBUST_MUTEX
        pthread_mutexattr_t a;
        pthread_mutexattr_init(&a);
        err = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        if (!err)
            err = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        if (!err)
            err = pthread_mutex_init(&p->mutex.m, &a);
        pthread_mutexattr_destroy(&a);
#else
        err = ENOTSUP;
#endif
    }
    if (!err)
        atomic_store_explicit((_Atomic uint64_t *)&p->h.magic, MAGIC, memory_order_release);
    munmap(p, PAGE_BYTES);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* set_identity(fd, sem_r_ino, sem_w_ino, file_dev, file_ino): the creator records what it
 * made after publishing the state file, before anyone else can hold its fds. */
static PyObject *mod_set_identity(PyObject *mod, PyObject *args)
{
    (void)mod;
    int fd;
    uint64_t w[4];
    if (!PyArg_ParseTuple(args, "iKKKK", &fd, &w[0], &w[1], &w[2], &w[3]))
        return NULL;
    if (pwrite(fd, w, 16, offsetof(struct header, sem_ino)) != 16 ||
        pwrite(fd, w + 2, 16, offsetof(struct header, file_dev)) != 16)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* read_header(fd) -> dict: a state file's head read by pread and validated (attach).  Only
 * the head is read, onto the stack: the whole page (33 KB) would not fit a small thread
 * stack (threading.stack_size(32768)). */
static PyObject *mod_read_header(PyObject *mod, PyObject *arg)
{
    PyObject *error = ((module_state *)PyModule_GetState(mod))->state_error;
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    struct head hd;
    struct stat st;
    ssize_t n, want = (ssize_t)sizeof hd;
    Py_BEGIN_ALLOW_THREADS
    n = fstat((int)fd, &st) == 0 ? pread((int)fd, &hd, (size_t)want, 0) : -1;
    Py_END_ALLOW_THREADS
    if (n < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (n != want)
        return PyErr_Format(error, "the state file is too short");
    if (check_head(&hd, st.st_size, error) != 0)
        return NULL;
    const struct header *h = &hd.h;
    return Py_BuildValue(
        "{sy#sKsisisisisKsKsKsKsKsK}", "id", (const char *)h->id, (Py_ssize_t)16,
        "counter", (unsigned long long)atomic_load(&hd.w.counter),
        "nonblock", (int)atomic_load(&hd.w.nonblock),
        "semaphore", (int)h->semaphore, "mutex_kind", (int)h->mutex_kind,
        "carrier", (int)h->carrier, "pipe_dev", (unsigned long long)h->pipe_dev,
        "pipe_ino", (unsigned long long)h->pipe_ino,
        "sem_r_ino", (unsigned long long)h->sem_ino[0],
        "sem_w_ino", (unsigned long long)h->sem_ino[1],
        "file_dev", (unsigned long long)h->file_dev, "file_ino", (unsigned long long)h->file_ino);
}

/* _arm(step, action, arg, nth) / _disarm(): fault injection, for the test suite only. */
static PyObject *mod_arm(PyObject *mod, PyObject *args)
{
    (void)mod;
    static const char *const actions[] = {"kill", "stop", "exit", "signal", "block"};
    const char *name, *action;
    int arg, step = STEP_NONE, act = -1;
    long nth;
    if (!PyArg_ParseTuple(args, "ssil", &name, &action, &arg, &nth))
        return NULL;
    for (int i = 0; i < NSTEPS; i++)
        if (strcmp(step_names[i], name) == 0)
            step = i;
    for (int i = 0; i < 5; i++)
        if (strcmp(actions[i], action) == 0)
            act = i;
    if (step == STEP_NONE || act < 0 || nth < 1)
        return PyErr_Format(PyExc_ValueError, "unknown fault step or action: %s=%s", name, action);
    fault_action = act;
    fault_arg = arg;
    atomic_store(&fault_countdown, nth);
    atomic_store(&fault_step, step);
    Py_RETURN_NONE;
}

/* _spin(seconds): how long a blocking normal-mode read watches the counter (bench, tests).
 * Atomic: a slow path reads it without the GIL. */
static PyObject *mod_spin(PyObject *mod, PyObject *arg)
{
    (void)mod;
    double t = PyFloat_AsDouble(arg);
    if (t == -1.0 && PyErr_Occurred())
        return NULL;
    if (!(t >= 0 && t <= 0.01))
        return PyErr_Format(PyExc_ValueError, "spin must be within 0..10 ms");
    int64_t old = atomic_exchange(&spin_ns, (int64_t)(t * 1e9 + 0.5));
    return PyFloat_FromDouble((double)old * 1e-9);
}

/* _step(seconds): the wait step of threads other than the main one (tests only: a test that
 * must tell a post from a step's look makes the steps outlast it).  Taken at a wait's start;
 * relaxed: a wait that starts with the old step is as correct, only sooner to look. */
static PyObject *mod_step(PyObject *mod, PyObject *arg)
{
    (void)mod;
    double t = PyFloat_AsDouble(arg);
    if (t == -1.0 && PyErr_Occurred())
        return NULL;
    if (!(t >= 2 * STEP_GRID && t <= 86400))
        return PyErr_Format(PyExc_ValueError, "step must be within 20 ms..1 day");
    int64_t old = atomic_exchange(&step_ns, (int64_t)(t * 1e9 + 0.5));
    return PyFloat_FromDouble((double)old * 1e-9);
}

static PyObject *mod_disarm(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    atomic_store(&fault_step, STEP_NONE);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"init_page", mod_init_page, METH_VARARGS, "Write a fresh header into a state file."},
    {"set_identity", mod_set_identity, METH_VARARGS, "Record the semaphores' and lock file's identity."},
    {"read_header", mod_read_header, METH_O, "Read and validate a state file's header."},
    {"_arm", mod_arm, METH_VARARGS, "Arm a fault at a named step (tests only)."},
    {"_disarm", mod_disarm, METH_NOARGS, "Disarm the fault hook."},
    {"_spin", mod_spin, METH_O, "Set the read spin (seconds); returns the old one."},
    {"_step", mod_step, METH_O, "Set other threads' wait step (seconds; tests only)."},
    {NULL}};

/* -- the module: multi-phase init, module state, no GIL ------------------------------------- */

/* The process-wide part of the import, once per process (the fork handlers are the
 * process's), and the one interpreter it belongs to: the state of a process (its fork
 * generation, the cores a fork child walks) cannot be shared with a second interpreter. */
static _Atomic int64_t owner_interp = -1;

static int init_process(void)
{
    int64_t me = PyInterpreterState_GetID(PyInterpreterState_Get()), none = -1;
    if (!atomic_compare_exchange_strong(&owner_interp, &none, me)) {
        if (none == me)
            return 0; /* imported again in the same interpreter */
        PyErr_SetString(PyExc_ImportError, "mpeventfd._core is already loaded by another "
                        "interpreter of this process: one interpreter per process can use it");
        return -1;
    }
    PyObject *threading = PyImport_ImportModule("threading");
    PyObject *main = threading ? PyObject_CallMethod(threading, "main_thread", NULL) : NULL;
    PyObject *ident = main ? PyObject_GetAttrString(main, "ident") : NULL;
    Py_XDECREF(threading);
    Py_XDECREF(main);
    if (!ident)
        goto fail;
    atomic_store(&main_ident, PyLong_AsUnsignedLong(ident));
    Py_DECREF(ident);
    all_cores.next = all_cores.prev = &all_cores;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        cpus = CPU_COUNT(&set);
#endif
    atomic_store(&spin_ns, cpus > 1 ? (int64_t)(SPIN_READ * 1e9) : 0);
    lock_cpus = (int)cpus;
    if (pthread_atfork(before_fork, after_fork_parent, after_fork_child) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
        goto fail;
    }
    return 0;
fail:
    atomic_store(&owner_interp, -1);
    return -1;
}

static int module_exec(PyObject *m)
{
    module_state *st = PyModule_GetState(m);
    if (init_process() != 0)
        return -1;
    PyObject *errors = PyImport_ImportModule("mpeventfd._errors");
    if (!errors)
        return -1;
    st->state_error = PyObject_GetAttrString(errors, "StateError");
    Py_DECREF(errors);
    if (!st->state_error)
        return -1;
    st->core_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &core_spec, NULL);
    if (!st->core_type || PyModule_AddType(m, st->core_type) != 0)
        return -1;
    st->handle_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &handle_spec, NULL);
    if (!st->handle_type || PyModule_AddType(m, st->handle_type) != 0)
        return -1;
    PyObject *steps = PyTuple_New(NSTEPS);
    if (!steps)
        return -1;
    for (int i = 0; i < NSTEPS; i++) {
        PyObject *name = PyUnicode_FromString(step_names[i]);
        if (!name) {
            Py_DECREF(steps);
            return -1;
        }
        PyTuple_SET_ITEM(steps, i, name);
    }
    /* The wait steps, in seconds, for the tests that count what a wait does per step. */
    if (PyModule_Add(m, "STEPS", steps) != 0 ||
        PyModule_Add(m, "MAX_VALUE", PyLong_FromUnsignedLongLong(MAX_VALUE)) != 0 ||
        PyModule_Add(m, "STEP_MAIN", PyFloat_FromDouble(STEP_MAIN)) != 0 ||
        PyModule_Add(m, "STEP_OTHER", PyFloat_FromDouble(STEP_OTHER)) != 0 ||
        PyModule_Add(m, "STEP_GRID", PyFloat_FromDouble(STEP_GRID)) != 0)
        return -1;
    struct { const char *name; long long v; } ints[] = {
        {"SIZE", (long long)PAGE_BYTES}, {"NSLOTS", NSLOTS},
        {"MUTEX_ROBUST", MUTEX_ROBUST}, {"MUTEX_BYTE", MUTEX_BYTE},
        {"CARRIER_PIPE", CARRIER_PIPE}, {"CARRIER_FILE", CARRIER_FILE},
        {"OFFSET_COUNTER", offsetof(struct page, w.counter)},
        {"OFFSET_NONBLOCK", offsetof(struct page, w.nonblock)},
        {"OFFSET_DIRTY", offsetof(struct page, w.dirty)},
        {"OFFSET_ARMED", offsetof(struct page, w.armed)},
        {"OFFSET_HWM", offsetof(struct page, w.hwm)},
        {"OFFSET_KICK", offsetof(struct page, w.kick)},
        {"OFFSET_WP_R", offsetof(struct page, w.wp[READER])},
        {"OFFSET_WP_W", offsetof(struct page, w.wp[WRITER])},
        {"OFFSET_SEMAPHORE", offsetof(struct page, h.semaphore)},
        {"OFFSET_MUTEX_KIND", offsetof(struct page, h.mutex_kind)},
        {"OFFSET_CARRIER", offsetof(struct page, h.carrier)},
        {"OFFSET_VERSION", offsetof(struct page, h.version)},
        {"OFFSET_MAGIC", offsetof(struct page, h.magic)},
        {"OFFSET_NSLOTS", offsetof(struct page, h.nslots)},
        {"OFFSET_LIBC", offsetof(struct page, h.libc)},
        {"OFFSET_PTR_BITS", offsetof(struct page, h.ptr_bits)},
        {"OFFSET_MUTEX_SIZE", offsetof(struct page, h.mutex_size)},
        {"OFFSET_MUTEX", offsetof(struct page, mutex)},
        {"LIBC", LIBC},
#ifdef HAVE_ROBUST_MUTEX
        {"HAVE_ROBUST_MUTEX", 1},
#else
        {"HAVE_ROBUST_MUTEX", 0},
#endif
#ifdef HAVE_OFD_LOCKS
        {"HAVE_OFD_LOCKS", 1},
#else
        {"HAVE_OFD_LOCKS", 0},
#endif
#if defined(HAVE_SEM_CLOCKWAIT) || defined(HAVE_SEM_TIMEDWAIT)
        {"HAVE_TIMED_SEM_WAIT", 1},
#else
        {"HAVE_TIMED_SEM_WAIT", 0},
#endif
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if (PyModule_AddIntConstant(m, ints[i].name, (long)ints[i].v) != 0)
            return -1;
    return 0;
}

static int module_traverse(PyObject *m, visitproc visit, void *arg)
{
    module_state *st = PyModule_GetState(m);
    Py_VISIT(st->state_error);
    Py_VISIT(st->core_type);
    Py_VISIT(st->handle_type);
    return 0;
}

static int module_clear(PyObject *m)
{
    module_state *st = PyModule_GetState(m);
    Py_CLEAR(st->state_error);
    Py_CLEAR(st->core_type);
    Py_CLEAR(st->handle_type);
    return 0;
}

static void module_free(void *m) { module_clear((PyObject *)m); }

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED}, /* every shared word is an atomic or under a lock */
#endif
    {0, NULL}};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "mpeventfd._core",
    "The critical sections of mpeventfd, each one C call (see docs/design.md).",
    sizeof(module_state), module_methods, module_slots, module_traverse, module_clear,
    module_free,
};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&module_def); }
