/*
 * mpeventfd/_core.c - the critical sections of mpeventfd, each one C call.
 *
 * One eventfd is a shared page (a file on /dev/shm, mapped MAP_SHARED by every process
 * that holds it), a notifier pipe whose read end is fileno(), and two named semaphores on
 * which blocked readers and writers sleep.  docs/design.md explains the design; this file
 * holds every instruction that runs while an eventfd's lock is held, and the waits.
 *
 * Rules every function below keeps:
 *  - No Python object is touched, no memory allocated and the GIL never awaited while the
 *    cross-process lock is held: a contended lock is taken, used and released with the GIL
 *    released.  Python handlers run only between bytecodes, so none runs inside a section.
 *  - Every word of the shared page that changes after creation is a C11 atomic, accessed
 *    seq_cst (the default) unless a comment proves a weaker order enough.  x86 tests cannot
 *    catch an ordering bug; ARM users would.
 *  - Only a lock holder moves the counter across zero, so while the lock is held the
 *    counter's zero-ness changes only by the holder's own hand (invariant I2).
 *  - A transition that needs more than one store is bracketed by `dirty` (set before its
 *    first effect, cleared after its last); whoever next takes the lock and finds `dirty`,
 *    or gets EOWNERDEAD, repairs (I4).
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

/* Shared memory between processes needs atomics that never fall back to a process-local lock. */
_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "64-bit atomics must be lock-free");
_Static_assert(sizeof(unsigned long long) == 8, "64-bit words");

#define MAX_VALUE 0xfffffffffffffffeULL
#define MAGIC 0x3356444645504d00ULL /* "\0MPEFDV3" read as a little-endian word */
#define VERSION 3
#define NSLOTS 1024
#define READER 0
#define WRITER 1

/* The lock kinds (page.mutex_kind) and where the byte locks live (page.carrier). */
#define MUTEX_ROBUST 1 /* a robust process-shared pthread mutex in the page */
#define MUTEX_BYTE 2   /* a kernel byte lock (MUTEX_BYTE) on the private description */
#define CARRIER_PIPE 1 /* OFD locks on a private read-write description of the pipe */
#define CARRIER_FILE 2 /* classic fcntl locks on the lock file (macOS, the BSDs) */
/* Byte offsets of the kernel byte locks: ranges name locks, they hold no data. */
#define MUTEX_BYTE_OFFSET 0
#define ATTACHED_BYTE 1    /* read-locked by every process attached (that will liveness-test) */
#define LIVENESS_BASE 4096 /* + slot index: locked by the slot's owner while it lives */

/* Timing (seconds). */
#define STEP_MAIN 0.05  /* the main thread checks signals at least this often */
#define STEP_OTHER 0.25 /* other threads re-check their wait at least this often */
#define PATIENCE 1.0    /* a non-blocking call waits this long for a held lock */
#define AIO_PATIENCE 1e-3 /* ... and aread's try_read about this long: it blocks a loop */
#define POST_BOUND 65536 /* posts per section: a scribbled count cannot loop for ever */
/* A blocking normal-mode read watches the counter this long before it sleeps.  Chosen by
 * `python -m mpeventfd bench --only S` (README "Performance"): 10 us already keeps a
 * ping-pong partner awake (round trip 1.7-2.4 us, as with 25 or 50 us; 14-17 us without),
 * for 9-15 us of CPU per blocking read that finds nothing, where 50 us costs 46-56. */
#define SPIN_READ 10e-6
#define LOCK_SPIN 2e-6  /* a busy robust mutex is retried this long, spinning, ... */
#define LOCK_YIELDS 3   /* ... then this many times, yielding the CPU, before sleeping on it */

/*
 * The shared page, word by word (layout version 3, native byte order).
 * Words up to `nslots` are written once by the creator before `magic` (with release order)
 * and only read afterwards; attachers validate them first (read_header).
 */
struct slot {
    _Atomic uint64_t pid;        /* owner, 0 = free; trusted only while its liveness byte is locked */
    _Atomic uint64_t waiting[2]; /* the owner's registered readers, writers (part of page.waiting) */
    uint64_t spare;
};

struct page {
    uint64_t magic;       /*   0 */
    uint64_t version;     /*   8 */
    uint64_t size;        /*  16 */
    uint8_t id[16];       /*  24: the 128-bit id; names derive from it */
    uint64_t semaphore;   /*  40: EFD_SEMAPHORE, fixed */
    uint64_t mutex_kind;  /*  48: MUTEX_ROBUST or MUTEX_BYTE */
    uint64_t carrier;     /*  56: CARRIER_PIPE or CARRIER_FILE */
    uint64_t creator;     /*  64: pid of the creator (diagnostics) */
    uint64_t pipe_dev;    /*  72: identity of the notifier pipe */
    uint64_t pipe_ino;    /*  80 */
    uint64_t sem_ino[2];  /*  88: inodes of the semaphores where the OS shows them (else 0) */
    uint64_t file_dev;    /* 104: identity of the lock file (CARRIER_FILE, else 0) */
    uint64_t file_ino;    /* 112 */
    uint64_t nslots;      /* 120 */
    _Atomic uint64_t counter;    /* 128: the eventfd counter, 0..MAX_VALUE */
    _Atomic uint64_t nonblock;   /* 136: O_NONBLOCK of the one "open file description" */
    _Atomic uint64_t dirty;      /* 144: a holder is (or died) between related stores */
    _Atomic uint64_t armed;      /* 152: the pipe mirrors counter > 0 (readiness armed) */
    _Atomic uint64_t waiting[2]; /* 160: registered readers W_r, writers W_w */
    _Atomic uint64_t posted[2];  /* 176: posts issued and not yet accounted, P_r, P_w */
    _Atomic uint64_t hwm;        /* 192: slots ever claimed (scan bound) */
    _Atomic uint64_t repairs;    /* 200: repairs done (diagnostics) */
    uint8_t pad1[256 - 208];
    union {
        pthread_mutex_t m; /* MUTEX_ROBUST: glibc keeps its owner list pointers here */
        uint8_t reserve[128];
    } mutex;               /* 256 */
    uint8_t pad2[512 - 384];
    struct slot slots[NSLOTS]; /* 512: one per process that ever waited */
};
_Static_assert(offsetof(struct page, counter) == 128, "layout");
_Static_assert(offsetof(struct page, mutex) == 256, "layout");
_Static_assert(offsetof(struct page, slots) == 512, "layout");
_Static_assert(sizeof(pthread_mutex_t) <= 128, "the mutex fits its reserve");
#define PAGE_BYTES sizeof(struct page) /* 33,280 bytes */

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
    X(LOCK_TAKEN, "lock.taken") X(LOCK_UNLOCKED, "lock.unlocked") \
    X(REPAIR_START, "repair.start") X(REPAIR_SLOTS, "repair.slots") \
    X(REPAIR_PIPE, "repair.pipe") X(REPAIR_POSTED, "repair.posted") \
    X(REPAIR_DONE, "repair.done") X(SLOT_CLAIMED, "slot.claimed")
#define AS_ENUM(e, s) STEP_##e,
#define AS_NAME(e, s) s,
enum { STEP_NONE = -1, STEPS(AS_ENUM) NSTEPS };
static const char *const step_names[] = {STEPS(AS_NAME)};
enum { ACT_KILL, ACT_STOP, ACT_EXIT, ACT_SIGNAL, ACT_BLOCK };
static int fault_step = STEP_NONE, fault_action, fault_arg;
static long fault_countdown;

static void fault_hit(int step)
{
    if (step != fault_step || --fault_countdown > 0)
        return;
    fault_step = STEP_NONE;
    switch (fault_action) {
    case ACT_KILL: kill(getpid(), SIGKILL); break;
    case ACT_STOP: kill(getpid(), SIGSTOP); break;
    case ACT_EXIT: _exit(86);
    case ACT_SIGNAL: raise(fault_arg); break; /* its Python handler runs after the call */
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
#define STEP(name) do { if (__builtin_expect(fault_step != STEP_NONE, 0)) fault_hit(STEP_##name); } while (0)

/* -- process-wide state ------------------------------------------------------------------- */

static PyObject *StateError;         /* mpeventfd.StateError */
static unsigned long main_ident;     /* the thread that runs Python's signal handlers */
static _Atomic unsigned long fork_gen; /* bumped in every fork child */
static _Atomic uint64_t woken;         /* posts consumed by this process (tests, stats) */
static _Atomic uint64_t woken_busy;    /* ... after which the lock was still held */

typedef struct Core Core;
struct Core {
    PyObject_HEAD
    struct page *pg;       /* MAP_SHARED; mapped by us (no dup of the fd, unlike mmap.mmap) */
    int fd[3];             /* state file, pipe read end (fileno), write end: they travel */
    int priv;              /* private description: byte locks and the drain; -1 in a fork child */
    int spare;             /* a private description opened for the next fork child */
    sem_t *sem[2];         /* blocked readers, writers */
    int semaphore;         /* page.semaphore, cached */
    int mutex_kind, carrier;
    int poll_waits;        /* no timed semaphore wait here: trywait with a back-off */
    int slot;              /* our slot, -1 until we first wait */
    unsigned long gen;     /* the fork generation priv, slot and local belong to */
    _Atomic uint64_t abandoned[2]; /* registrations left without the lock, settled later */
    pthread_mutex_t local; /* MUTEX_BYTE: a byte lock cannot tell threads apart */
    /* Fields below are changed only with the GIL held (the free-threaded build will need a
     * lock of their own here). */
    int inflight;          /* calls between Py_BEGIN/END_ALLOW_THREADS */
    int stuck;             /* try_read's last wait for the lock timed out (core_try_read) */
    int closed, freed;
    int alone;             /* at free: no other attached process was left */
    PyObject *on_free;     /* called once resources are freed after close() */
    char *file_path;       /* CARRIER_FILE: the lock file */
    Core *next, *prev;     /* every live core, for the fork child */
};
static Core all_cores; /* list head (GIL) */

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

static int is_main_thread(void) { return PyThread_get_thread_ident() == main_ident; }

static uint64_t min64(uint64_t a, uint64_t b) { return a < b ? a : b; }

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

/* True while the process owning slot `i` lives: its liveness byte is locked.  Our own locks
 * are invisible to the query (same description, or same process), so never ask about ours. */
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

/* -- wake-ups: the post rule and its accounting (tools/wake_model.py checks it) -------------
 *
 * Per class the page counts registered waiters W and posts issued but not yet accounted P;
 * each slot counts its own process's waiters.  After a transition, post until P covers the
 * readers that can proceed: min(c, W_r) in semaphore mode, min(1, W_r) otherwise.  A read
 * that made room posts every registered writer: their sizes differ, each re-checks its
 * own.  Posts are accounted under the lock and made after the unlock (pay); a death in
 * between is made up for by the waiters' bounded steps (unregister, EXPIRED).  A waiter
 * accounts after each wait step (docs/design.md §6; the model checks variant V4). */

/* Posts this thread's section has accounted and will make once it unlocks: a reader woken
 * while the lock is still held would only sleep again, on the lock. */
static _Thread_local uint32_t owed[2];

static void owe(Core *c, int cls, uint64_t posted, uint64_t want)
{
    uint64_t n = min64(want - posted, POST_BOUND); /* (a scribbled count cannot loop) */
    atomic_store(&c->pg->posted[cls], posted + n);  /* account now, post after unlock */
    owed[cls] += (uint32_t)n;
}

static void restore_readers(Core *c)
{
    struct page *p = c->pg;
    uint64_t cnt = atomic_load(&p->counter);
    uint64_t w = atomic_load(&p->waiting[READER]);
    if (!cnt || !w)
        return;
    uint64_t want = c->semaphore ? min64(cnt, w) : 1;
    uint64_t posted = atomic_load(&p->posted[READER]);
    if (posted < want)
        owe(c, READER, posted, want);
}

static void restore_writers(Core *c)
{
    struct page *p = c->pg;
    uint64_t w = atomic_load(&p->waiting[WRITER]);
    uint64_t posted = atomic_load(&p->posted[WRITER]);
    if (posted < w)
        owe(c, WRITER, posted, w);
}

/* After the unlock: the posts accounted under the lock.  A death before they are made
 * loses them; the waiters' bounded steps find out (unregister, EXPIRED). */
static void pay(Core *c)
{
    for (int cls = READER; cls <= WRITER; cls++)
        for (; owed[cls]; owed[cls]--)
            if (sem_post(c->sem[cls]) != 0) { /* EOVERFLOW: more pending than anyone can use */
                owed[cls] = 0;
                break;
            }
}

static void dec_floor(_Atomic uint64_t *w, uint64_t n)
{
    uint64_t v = atomic_load(w);
    atomic_store(w, v - min64(v, n));
}

/* Drop a dead slot's registrations, assuming each consumed a post (the safe direction). */
static void forget_slot(Core *c, int i)
{
    struct page *p = c->pg;
    struct slot *s = &p->slots[i];
    for (int cls = READER; cls <= WRITER; cls++) {
        uint64_t n = atomic_load(&s->waiting[cls]);
        if (n) {
            dec_floor(&p->waiting[cls], n);
            dec_floor(&p->posted[cls], n);
            atomic_store(&s->waiting[cls], 0);
        }
    }
    atomic_store(&s->pid, 0);
}

/* Forget the registrations of processes whose liveness byte the kernel released. */
static void correct_dead(Core *c)
{
    struct page *p = c->pg;
    uint64_t hwm = min64(atomic_load(&p->hwm), NSLOTS);
    for (int i = 0; i < (int)hwm; i++) {
        struct slot *s = &p->slots[i];
        if (i == c->slot || !(atomic_load(&s->waiting[0]) || atomic_load(&s->waiting[1])))
            continue;
        if (!slot_alive(c, i))
            forget_slot(c, i);
    }
}

/* Claim a slot: lock a liveness byte first, then take over whatever its dead owner left. */
static int claim_slot(Core *c)
{
    struct page *p = c->pg;
    uint64_t hwm = min64(atomic_load(&p->hwm), NSLOTS);
    for (int i = 0; i < NSLOTS; i++) {
        if (i < (int)hwm && atomic_load(&p->slots[i].pid) && slot_alive(c, i))
            continue;
        if (byte_try(c, F_WRLCK, LIVENESS_BASE + i) != 0)
            continue;
        atomic_store(&p->dirty, 1);
        forget_slot(c, i);
        atomic_store(&p->slots[i].pid, (uint64_t)getpid());
        if ((uint64_t)i >= hwm)
            atomic_store(&p->hwm, (uint64_t)i + 1);
        atomic_store(&p->dirty, 0);
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
    atomic_store(&p->dirty, 1);
    atomic_fetch_add(&p->waiting[cls], 1);
    atomic_fetch_add(&p->slots[c->slot].waiting[cls], 1);
    atomic_store(&p->dirty, 0);
    return 0;
}

/* How a wait step ended. */
enum { NOWAIT, CONSUMED, EXPIRED, FAILED };

/* Account a registration after its wait step ended `how` (NOWAIT: it never waited). */
static void unregister(Core *c, int cls, int how)
{
    struct page *p = c->pg;
    atomic_store(&p->dirty, 1);
    dec_floor(&p->waiting[cls], 1);
    dec_floor(&p->slots[c->slot].waiting[cls], 1);
    if (how == CONSUMED || how == FAILED) /* FAILED: outcome unknown, assume consumed */
        dec_floor(&p->posted[cls], 1);
    atomic_store(&p->dirty, 0);
    if (how == NOWAIT || how == CONSUMED)
        return;
    if (how == EXPIRED && atomic_load(&p->posted[cls]) > atomic_load(&p->waiting[cls])) {
        /* More posts accounted than waiters: a post meant for us arrived as the step ended
         * (absorb it, so strays cannot pile up), or its poster died between unlocking and
         * posting (then there is none to take, and the count drops all the same).  Were it
         * only late, it becomes a stray: a spurious wake-up, never a lost one (I6). */
        atomic_fetch_sub(&p->posted[cls], 1);
        sem_trywait(c->sem[cls]);
    }
    if (how == EXPIRED) {
        atomic_store(&p->dirty, 1);
        correct_dead(c);
        atomic_store(&p->dirty, 0);
    }
    restore_readers(c);
    /* (Writers are posted when room grows: by reads, repairs and the lock-free read's
     * post.  Posting them here would wake every blocked writer at each expiry.) */
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
 * the repair only makes the next holder repeat it. */
static void repair(Core *c)
{
    struct page *p = c->pg;
    STEP(REPAIR_START);
    atomic_store(&p->dirty, 1);
    correct_dead(c);
    uint64_t hwm = min64(atomic_load(&p->hwm), NSLOTS), w[2] = {0, 0};
    for (int i = 0; i < (int)hwm; i++)
        if (atomic_load(&p->slots[i].pid))
            for (int cls = READER; cls <= WRITER; cls++)
                w[cls] += atomic_load(&p->slots[i].waiting[cls]);
    for (int cls = READER; cls <= WRITER; cls++) {
        atomic_store(&p->waiting[cls], w[cls]);
        atomic_store(&p->posted[cls], min64(atomic_load(&p->posted[cls]), w[cls]));
    }
    STEP(REPAIR_SLOTS);
    if (atomic_load(&p->armed)) {
        /* Readiness from the committed counter.  Lock-free writers act only on a counter
         * > 0, so the zero-ness read here holds until we unlock. */
        int queued = pipe_pending(c);
        uint64_t cnt = atomic_load(&p->counter);
        if (cnt && !queued)
            pipe_byte(c);
        else if (!cnt && queued)
            pipe_drain(c);
    }
    STEP(REPAIR_PIPE);
    restore_readers(c);
    restore_writers(c);
    STEP(REPAIR_POSTED);
    atomic_fetch_add(&p->repairs, 1);
    atomic_store(&p->dirty, 0);
    STEP(REPAIR_DONE);
}

/* -- the lock ------------------------------------------------------------------------------ */

enum { LOCKED = 0, OWNER_DIED = 1, BUSY = -1, BROKEN = -2 };

static int robust_result(int r)
{
    return r == 0 ? LOCKED : r == EOWNERDEAD ? OWNER_DIED : r == ENOTRECOVERABLE ? BROKEN : BUSY;
}

/* Try once.  LOCKED, OWNER_DIED (locked; the previous holder died inside), BUSY, BROKEN. */
static int lock_try(Core *c)
{
#ifdef HAVE_ROBUST_MUTEX
    if (c->mutex_kind == MUTEX_ROBUST)
        return robust_result(pthread_mutex_trylock(&c->pg->mutex.m));
#endif
    if (pthread_mutex_trylock(&c->local) != 0)
        return BUSY;
    if (byte_try(c, F_WRLCK, MUTEX_BYTE_OFFSET) != 0) {
        pthread_mutex_unlock(&c->local);
        return BUSY;
    }
    return LOCKED;
}

/* A section holds the lock for a fraction of a microsecond while its holder runs: a busy
 * robust mutex is retried for LOCK_SPIN before anything else (an adaptive mutex; robust
 * mutexes do not spin), by the clock, since a PAUSE takes from under 1 ns to 16 ns (16 on
 * this Xeon: 800 of them, once meant as 2 us, were 12.5 us).  Not for the byte lock, whose
 * every try is a system call, and not on one CPU. */
static int lock_cpus = 1;

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int lock_spin(Core *c)
{
    int r = lock_try(c);
    if (r != BUSY || c->mutex_kind != MUTEX_ROBUST || lock_cpus < 2)
        return r;
    double end = now() + LOCK_SPIN;
    do {
        for (int j = 0; j < 8; j++)
            cpu_relax();
        r = lock_try(c);
    } while (r == BUSY && now() < end);
    return r;
}

/* A holder still busy past the spin has usually been preempted, often by the very wake-up
 * its section caused (a pipe byte goes in before a commit): yielding the CPU a few times
 * lets a holder that waits for this CPU finish, which costs less than a sleep on the lock
 * and a wake-up from its unlock.  Without the GIL: a yield may last a scheduler slice; and
 * none starts after `stop`.  (On one CPU too, where the holder can only be waiting for it.) */
static int lock_yield(Core *c, double stop)
{
    int r = lock_try(c);
    for (int i = 0; i < LOCK_YIELDS && r == BUSY && c->mutex_kind == MUTEX_ROBUST &&
                    now() < stop; i++) {
        sched_yield();
        r = lock_try(c);
    }
    return r;
}

/* Wait for a pthread mutex until `stop` (monotonic); 0 or an errno. */
static int mutex_until(pthread_mutex_t *m, double stop)
{
#if defined(HAVE_MUTEX_CLOCKLOCK)
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
static int lock_until(Core *c, double stop)
{
#ifdef HAVE_ROBUST_MUTEX
    if (c->mutex_kind == MUTEX_ROBUST)
        return robust_result(mutex_until(&c->pg->mutex.m, stop));
#endif
    if (mutex_until(&c->local, stop) != 0)
        return BUSY;
    /* F_SETLKW cannot time out, and a stopped holder must not hold a timed call hostage:
     * poll with a back-off.  Live holders keep the lock for microseconds. */
    double delay = 20e-6;
    while (byte_try(c, F_WRLCK, MUTEX_BYTE_OFFSET) != 0) {
        double left = stop - now();
        if (left <= 0) {
            pthread_mutex_unlock(&c->local);
            return BUSY;
        }
        nap(delay < left ? delay : left);
        delay = delay * 2 < 2e-3 ? delay * 2 : 2e-3;
    }
    return LOCKED;
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
    STEP(LOCK_UNLOCKED);
    pay(c);
}

/* After taking the lock: repair what a dead holder left, then mark a robust mutex
 * consistent (unlocking without that would make it ENOTRECOVERABLE for good). */
static void locked(Core *c, int how)
{
    STEP(LOCK_TAKEN);
    if (how == OWNER_DIED || atomic_load(&c->pg->dirty))
        repair(c);
#ifdef HAVE_ROBUST_MUTEX
    if (how == OWNER_DIED)
        pthread_mutex_consistent(&c->pg->mutex.m);
#endif
}

/* -- the sections -------------------------------------------------------------------------- */

enum { OP_READ, OP_WRITE, OP_POST, OP_ARM };
enum { S_DONE, S_WAIT, S_AGAIN, S_TIMEDOUT, S_EUSERS, S_CORRUPT, S_RETRY };

/* n -> 0: a normal read, or a semaphore read of 1.  The drain comes after the commit.
 * Returns what was taken, or 0 when a lock-free writer changed a semaphore-mode 1 first. */
static uint64_t take_all(Core *c, uint64_t cnt)
{
    struct page *p = c->pg;
    atomic_store(&p->dirty, 1);
    STEP(READ_DIRTY);
    uint64_t got = 1;
    if (!c->semaphore)
        got = atomic_exchange(&p->counter, 0); /* with whatever lock-free writers added */
    else if (!atomic_compare_exchange_strong(&p->counter, &cnt, 0)) {
        atomic_store(&p->dirty, 0); /* nothing done: the caller looks again */
        return 0;
    }
    STEP(READ_COMMIT);
    if (atomic_load(&p->armed))
        pipe_drain(c);
    STEP(READ_DRAINED);
    restore_writers(c);
    STEP(READ_POSTED);
    atomic_store(&p->dirty, 0);
    return got;
}

/* 0 -> v: the pipe byte goes in before the commit.  Nobody else moves a zero counter. */
static void give_from_zero(Core *c, uint64_t v)
{
    struct page *p = c->pg;
    atomic_store(&p->dirty, 1);
    STEP(WRITE_DIRTY);
    if (atomic_load(&p->armed))
        pipe_byte(c);
    STEP(WRITE_PIPE);
    atomic_store(&p->counter, v);
    STEP(WRITE_COMMIT);
    restore_readers(c);
    STEP(WRITE_POSTED);
    atomic_store(&p->dirty, 0);
}

/* One attempt at the operation; the lock is held. */
static int attempt(Core *c, int op, uint64_t v, uint64_t *got)
{
    struct page *p = c->pg;
    uint64_t cnt = atomic_load(&p->counter);
    if (cnt > MAX_VALUE)
        return S_CORRUPT;
    if (op == OP_READ) {
        if (!cnt)
            return S_WAIT;
        if (c->semaphore && cnt >= 2) {
            /* Stays > 0: lock-free readers and writers may move it meanwhile, so CAS. */
            if (!atomic_compare_exchange_strong(&p->counter, &cnt, cnt - 1))
                return S_RETRY;
            STEP(READ_COMMIT);
            restore_writers(c);
            *got = 1;
            return S_DONE;
        }
        *got = take_all(c, cnt);
        return *got ? S_DONE : S_RETRY;
    }
    if (v > MAX_VALUE - cnt)
        return S_WAIT;
    if (!v)
        return S_DONE; /* write(0): always succeeds, changes nothing */
    if (!cnt) {
        give_from_zero(c, v);
        return S_DONE;
    }
    if (!atomic_compare_exchange_strong(&p->counter, &cnt, cnt + v))
        return S_RETRY;
    STEP(WRITE_COMMIT);
    restore_readers(c);
    return S_DONE;
}

/*
 * One critical section; the lock is held.  `*reg` is the class this call registered as in
 * its previous section (-1: none) and `how` says how its wait step ended.  Returns S_DONE
 * (with `*got` for a read), S_WAIT (registered as `*reg`: wait, then come back), or why
 * the call fails.
 */
static int section(Core *c, int op, uint64_t v, int *reg, int how, double until, uint64_t *got)
{
    struct page *p = c->pg;
    settle_abandoned(c);
    if (*reg >= 0) {
        unregister(c, *reg, how);
        *reg = -1;
        STEP(WAIT_ACCOUNTED);
    }
    if (op == OP_POST) { /* after a lock-free commit that waiters of class v must hear of */
        if (v == READER)
            restore_readers(c);
        else
            restore_writers(c); /* (a lock-free read made room) */
        return S_DONE;
    }
    if (op == OP_ARM) { /* readiness, for good: make the pipe match the counter first */
        if (!atomic_load(&p->armed)) {
            int queued = pipe_pending(c);
            uint64_t cnt = atomic_load(&p->counter); /* its zero-ness is ours to change */
            if (cnt && !queued)
                pipe_byte(c);
            else if (!cnt && queued)
                pipe_drain(c);
            atomic_store(&p->armed, 1);
        }
        return S_DONE;
    }
    if (op == OP_WRITE)
        STEP(WRITE_LOCKED);
    else
        STEP(READ_LOCKED);
    for (;;) {
        int s = attempt(c, op, v, got);
        if (s == S_RETRY)
            continue;
        if (s != S_WAIT)
            return s;
        if (until < 0)
            return S_AGAIN;
        if (until <= now())
            return S_TIMEDOUT;
        int cls = op == OP_READ ? READER : WRITER;
        if (register_waiter(c, cls) != 0)
            return S_EUSERS;
        if (cls == WRITER && v <= MAX_VALUE - atomic_load(&p->counter)) {
            /* The Dekker pair: a lock-free semaphore read CASes the counter, then loads
             * W_w; we added to W_w, then load the counter (all seq_cst).  One of the two
             * sees the other: we see the room it made, or it sees us and posts.  Readers
             * need no such pair: they register at 0, and only lock holders leave 0. */
            unregister(c, cls, NOWAIT);
            continue;
        }
        *reg = cls;
        STEP(WAIT_REGISTERED);
        return S_WAIT;
    }
}

/* -- waiting ------------------------------------------------------------------------------- */

/* One bounded wait for a post, without the GIL: CONSUMED, or EXPIRED (also for EINTR). */
static int wait_post(Core *c, int cls, double stop)
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
        return EXPIRED;
    atomic_fetch_add_explicit(&woken, 1, memory_order_relaxed); /* (a statistic only) */
    STEP(WAIT_WOKEN);
    return CONSUMED;
}

/* Run Python's signal handlers between steps (main thread only; no lock is held). */
static int check_signals(PyThreadState **ts)
{
    if (!is_main_thread())
        return 0;
    PyEval_RestoreThread(*ts);
    int r = PyErr_CheckSignals();
    *ts = PyEval_SaveThread();
    return r;
}

/* A registration whose call ends without the lock (a handler raised; the deadline passed
 * while a stopped peer holds the lock): account it now if the lock is free, else leave it
 * to this process's next section.  Until then it only causes extra posts. */
static void abandon(Core *c, int cls, int how)
{
    int r = lock_try(c);
    if (r == BUSY || r == BROKEN) {
        /* Settled later as an expired step (W - 1).  A post this wait consumed goes back
         * first: the count still has it, and another waiter may need it meanwhile. */
        if (how == CONSUMED)
            sem_post(c->sem[cls]);
        atomic_fetch_add(&c->abandoned[cls], 1);
        return;
    }
    locked(c, r);
    unregister(c, cls, how);
    unlock(c);
}

/* What a call ends with. */
enum { RES_OK, RES_ERROR /* a Python exception is set */, RES_AGAIN, RES_TIMEDOUT, RES_BUSY,
       RES_EUSERS, RES_CORRUPT, RES_FORKED };

static int result_of(int s)
{
    return s == S_DONE ? RES_OK : s == S_AGAIN ? RES_AGAIN : s == S_TIMEDOUT ? RES_TIMEDOUT
           : s == S_EUSERS ? RES_EUSERS : RES_CORRUPT;
}

/* Before a blocking normal-mode read sleeps, it watches the counter for a moment: an
 * answer often comes within microseconds (a ping-pong partner, a producer in a burst), and
 * seeing it saves the registration, the sleep and the wake-up.  The loads are relaxed:
 * only a hint, re-checked under the lock.  Never on one CPU (the writer could not run)
 * and never in semaphore mode (only the readers that can proceed should run). */
static double spin_seconds;

static void spin_for_counter(Core *c, double until)
{
    _Atomic uint64_t *counter = &c->pg->counter;
    double end = now() + spin_seconds;
    if (until < end)
        end = until;
    while (!atomic_load_explicit(counter, memory_order_relaxed) && now() < end)
        sched_yield(); /* let a writer that shares our CPU run */
}

/* Run the signal handlers between steps; RES_FORKED if one of them forked and we are now
 * the child, which must not go on with its parent's registration. */
static int between_steps(PyThreadState **ts, unsigned long gen)
{
    int r = check_signals(ts);
    if (atomic_load(&fork_gen) != gen)
        return RES_FORKED;
    return r < 0 ? RES_ERROR : RES_OK;
}

/*
 * The contended or blocking path, without the GIL.  `reg` >= 0: the caller's section has
 * already registered the call, so it waits first.  `lock_stop` bounds each wait for the
 * lock: the caller's deadline, PATIENCE from the first try for a non-blocking call,
 * AIO_PATIENCE for aread's, or the first try itself for a call that never waits for it.
 * With `interruptible` the main thread runs signal handlers between steps; a call that has
 * committed passes 0, so that a handler's exception can only come after it returns.
 * `spin`: watch the counter first (spin_for_counter).
 */
static int slow_path(Core *c, int op, uint64_t v, int reg, double until, double lock_stop,
                     int interruptible, int spin, uint64_t *got, PyThreadState **ts)
{
    int how = FAILED, res;
    unsigned long gen = atomic_load(&fork_gen);
    double step = is_main_thread() ? STEP_MAIN : STEP_OTHER;
    if (spin)
        spin_for_counter(c, until);
    if (reg >= 0)
        goto wait;
    for (;;) {
        int r = lock_try(c);
        if (how == CONSUMED && r == BUSY) /* (posts come after unlocks) */
            atomic_fetch_add_explicit(&woken_busy, 1, memory_order_relaxed);
        if (r == BUSY)
            r = lock_yield(c, lock_stop);
        while (r == BUSY) { /* the lock, in steps */
            double t = now();
            double stop = t + step < lock_stop ? t + step : lock_stop;
            r = stop > t ? lock_until(c, stop) : lock_try(c);
            if (r != BUSY)
                break;
            if (now() >= lock_stop) {
                if (reg >= 0)
                    abandon(c, reg, how);
                return until < 0 ? RES_BUSY : RES_TIMEDOUT;
            }
            if (interruptible && (res = between_steps(ts, gen)) != RES_OK) {
                if (reg >= 0 && res != RES_FORKED)
                    abandon(c, reg, how);
                return res;
            }
        }
        if (r == BROKEN) {
            if (reg >= 0)
                abandon(c, reg, how);
            return RES_CORRUPT;
        }
        locked(c, r);
        int s = section(c, op, v, &reg, how, until, got);
        unlock(c);
        if (s != S_WAIT)
            return result_of(s);
    wait: {
        double t = now(), stop = t + step < until ? t + step : until;
        how = wait_post(c, reg, stop);
        if (how == EXPIRED && interruptible && (res = between_steps(ts, gen)) != RES_OK) {
            if (res != RES_FORKED)
                abandon(c, reg, how);
            return res;
        }
        if (until != INFINITY) /* a registered waiter waits for the lock until its deadline */
            lock_stop = until;
    }
    }
}

/* -- fork ---------------------------------------------------------------------------------- */

/* pthread_atfork child handler: runs in the only thread of a new child, before any Python. */
static void after_fork_child(void)
{
    atomic_fetch_add(&fork_gen, 1);
    main_ident = PyThread_get_thread_ident();
    for (Core *c = all_cores.next; c && c != &all_cores; c = c->next) {
        c->inflight = 0; /* the calls in flight were the parent's other threads' */
        pthread_mutex_init(&c->local, NULL); /* another thread may have held it at fork */
    }
}

static int open_private(Core *c);

/* A fork child uses its own private description (the inherited one is the parent's: its
 * byte locks and liveness bytes are the parent's) and claims a slot of its own. */
static int ensure_own(Core *c)
{
    unsigned long g = atomic_load(&fork_gen);
    if (__builtin_expect(c->gen == g, 1))
        return 0;
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
        return -1;
    }
    c->gen = g;
    return 0;
}

/* -- the operations, with the GIL ---------------------------------------------------------- */

static void release_after(Core *c);

/* `op` on the locked path: one try with the GIL held (the usual case: no wait), else the
 * slow path without it.  `spin`: a blocking normal-mode read watches the counter first.
 * Returns a RES_ code. */
static int locked_op(Core *c, int op, uint64_t v, double until, double lock_stop,
                     int interruptible, int spin, uint64_t *got)
{
    if (ensure_own(c) != 0)
        return RES_ERROR;
    int reg = -1, r = BUSY, res = -1;
    spin = spin && spin_seconds > 0 && !atomic_load_explicit(&c->pg->counter,
                                                             memory_order_relaxed);
    c->inflight++; /* (also covers the test hook that lets the GIL go inside a section) */
    if (!spin)
        r = lock_spin(c);
    if (r == BROKEN)
        res = RES_CORRUPT;
    else if (r != BUSY) {
        locked(c, r);
        int s = section(c, op, v, &reg, FAILED, until, got);
        unlock(c);
        if (s != S_WAIT)
            res = result_of(s);
    }
    if (res < 0) {
        if (lock_stop < 0)
            lock_stop = now() + PATIENCE;
        PyThreadState *ts = PyEval_SaveThread();
        res = slow_path(c, op, v, reg, until, lock_stop, interruptible, spin, got, &ts);
        PyEval_RestoreThread(ts);
        if (res == RES_FORKED) /* a handler forked: this is the child, and its call ends */
            return res;        /* (its inflight count is its own, from zero) */
    }
    c->inflight--;
    release_after(c);
    return res;
}

/* After a lock-free commit that a waiter needs to hear of (`cls`).  The call has committed
 * and must not fail now: it waits for the lock no longer than the caller allows (and at most
 * PATIENCE), and runs no signal handler; a waiter whose post this skips re-checks under the
 * lock at the end of its wait step anyway. */
static void post_after(Core *c, int cls, double lock_stop)
{
    uint64_t unused;
    double limit = now() + PATIENCE;
    locked_op(c, OP_POST, (uint64_t)cls, -1.0, lock_stop >= 0 && lock_stop < limit ? lock_stop
              : limit, 0, 0, &unused);
    if (PyErr_Occurred()) /* (ensure_own in a fork child could fail; the write stands) */
        PyErr_Clear();
}

/* Do readers wait for a post that this lock-free write must issue?  (Right after its CAS.) */
static int readers_want(Core *c, uint64_t cnt)
{
    struct page *p = c->pg;
    uint64_t w = atomic_load(&p->waiting[READER]);
    if (!w)
        return 0;
    uint64_t want = c->semaphore ? min64(cnt, w) : 1;
    return atomic_load(&p->posted[READER]) < want;
}

static int core_write(Core *c, uint64_t v, double until, double lock_stop, int interruptible)
{
    struct page *p = c->pg;
    /* Lock-free: a write that finds the counter > 0 and leaves it > 0 is one CAS.  (A
     * write(0) takes the lock: it changes nothing, and repairs what a dead holder left.) */
    uint64_t cnt = atomic_load(&p->counter);
    while (cnt && v && cnt <= MAX_VALUE && v <= MAX_VALUE - cnt) {
        if (atomic_compare_exchange_weak(&p->counter, &cnt, cnt + v)) {
            STEP(WRITE_LOCKFREE);
            if (readers_want(c, cnt + v))
                post_after(c, READER, lock_stop);
            return RES_OK;
        }
    }
    uint64_t unused;
    return locked_op(c, OP_WRITE, v, until, lock_stop, interruptible, 0, &unused);
}

static int core_read(Core *c, double until, double lock_stop, uint64_t *got)
{
    struct page *p = c->pg;
    if (c->semaphore) {
        /* Lock-free: a semaphore read of a counter >= 2 is one CAS. */
        uint64_t cnt = atomic_load(&p->counter);
        while (cnt >= 2 && cnt <= MAX_VALUE) {
            if (atomic_compare_exchange_weak(&p->counter, &cnt, cnt - 1)) {
                STEP(READ_LOCKFREE);
                /* The other half of section()'s Dekker pair. */
                if (atomic_load(&p->waiting[WRITER]) > atomic_load(&p->posted[WRITER]))
                    post_after(c, WRITER, lock_stop);
                *got = 1;
                return RES_OK;
            }
        }
    }
    return locked_op(c, OP_READ, 0, until, lock_stop, 1, !c->semaphore && until != -1.0, got);
}

/* Readiness is armed once a pollable fd is handed out anywhere (fileno(), fds, handle,
 * aread): until then no transition touches the pipe, since nobody can poll it.  Arming
 * waits for the lock at most PATIENCE (BlockingIOError past it: a stopped holder). */
static int core_arm(Core *c)
{
    if (__builtin_expect(atomic_load(&c->pg->armed) != 0, 1))
        return RES_OK;
    uint64_t unused;
    return locked_op(c, OP_ARM, 0, INFINITY, now() + PATIENCE, 1, 0, &unused);
}

static PyObject *closed_error(void)
{
    set_oserror(EBADF, "Bad file descriptor: the EventFD is closed");
    return NULL;
}

/* Turn a RES_ code into the exception the caller sees (NULL), or NULL for RES_OK's caller to
 * build its result. */
static PyObject *raise_result(int r)
{
    switch (r) {
    case RES_AGAIN: set_oserror(EAGAIN, "Resource temporarily unavailable"); break;
    case RES_TIMEDOUT:
        set_oserror(ETIMEDOUT, "timed out: the eventfd did not become ready in time");
        break;
    case RES_BUSY:
        set_oserror(EAGAIN, "the eventfd's lock stayed held by another thread or process "
                            "(a stopped holder?) for longer than a non-blocking call waits");
        break;
    case RES_EUSERS: set_oserror(EUSERS, "more than 1024 processes wait on this eventfd"); break;
    case RES_FORKED:
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError,
                            "a signal handler forked during this eventfd call: the child does "
                            "not go on with it (the parent's call goes on)");
        break;
    case RES_CORRUPT:
        PyErr_SetString(StateError, "the shared state is out of range: the state file was "
                                    "corrupted by another process");
        break;
    }
    return NULL;
}

/* -- the Core type ------------------------------------------------------------------------- */

static void free_resources(Core *c)
{
    if (c->priv >= 0 && c->gen == atomic_load(&fork_gen)) {
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
    if (c->next) { /* off the list the fork child walks */
        c->prev->next = c->next;
        c->next->prev = c->prev;
        c->next = c->prev = NULL;
    }
    c->closed = c->freed = 1;
}

/* The last call out of a closed core frees it, then tells lifecycle (which liveness-tests). */
static void release_after(Core *c)
{
    if (!c->closed || c->inflight || c->freed)
        return;
    free_resources(c);
    if (c->on_free && c->on_free != Py_None) {
#if PY_VERSION_HEX >= 0x030C0000
        PyObject *saved = PyErr_GetRaisedException();
#else
        PyObject *t, *v, *tb;
        PyErr_Fetch(&t, &v, &tb);
#endif
        PyObject *r = PyObject_CallOneArg(c->on_free, (PyObject *)c);
        if (!r && PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
            PyErr_Clear(); /* a handler's Ctrl-C, which ran inside the callback: keep it */
            PyErr_SetInterrupt();
        } else if (!r) {
            PyErr_WriteUnraisable(c->on_free);
        }
        Py_XDECREF(r);
#if PY_VERSION_HEX >= 0x030C0000
        PyErr_SetRaisedException(saved);
#else
        PyErr_Restore(t, v, tb);
#endif
    }
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
        dev = c->pg->pipe_dev;
        ino = c->pg->pipe_ino;
    } else {
        fd = open(c->file_path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
        dev = c->pg->file_dev;
        ino = c->pg->file_ino;
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

/* Validate a header (from pread, or the mapping): range-check every field (I14). */
static int check_header(const struct page *h, off_t file_size)
{
    const char *why = NULL;
    if (file_size != (off_t)PAGE_BYTES)
        why = "the state file has the wrong size";
    else if (h->magic != MAGIC)
        why = "not an mpeventfd state file (bad magic)";
    else if (h->version != VERSION)
        why = "the state layout is of another version";
    else if (h->size != PAGE_BYTES || h->nslots != NSLOTS)
        why = "the state header records a foreign size or slot count";
    else if (h->semaphore > 1 || h->nonblock > 1 || h->dirty > 1 || h->armed > 1)
        why = "a state header flag is out of range";
    else if (h->counter > MAX_VALUE)
        why = "the state header's counter is out of range";
    else if (h->hwm > NSLOTS)
        why = "the state header's slot count is out of range";
    else if ((h->mutex_kind != MUTEX_ROBUST && h->mutex_kind != MUTEX_BYTE) ||
             (h->carrier != CARRIER_PIPE && h->carrier != CARRIER_FILE))
        why = "the state header names an unknown lock kind";
    if (why) {
        PyErr_SetString(StateError, why);
        return -1;
    }
    return 0;
}

static PyTypeObject CoreType;

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
    c->closed = c->freed = 1; /* until everything is in place */
    pthread_mutex_init(&c->local, NULL);
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
    if (check_header(c->pg, st.st_size) != 0)
        goto fail;
    if ((c->pg->carrier == CARRIER_FILE) != (lock_path != NULL)) {
        PyErr_SetString(StateError, "the lock file and the header disagree");
        goto fail;
    }
#ifndef HAVE_ROBUST_MUTEX
    if (c->pg->mutex_kind == MUTEX_ROBUST) {
        PyErr_SetString(StateError, "this eventfd uses a robust mutex, which this build lacks");
        goto fail;
    }
#endif
    c->semaphore = (int)c->pg->semaphore;
    c->mutex_kind = (int)c->pg->mutex_kind;
    c->carrier = (int)c->pg->carrier;
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
    c->gen = atomic_load(&fork_gen);
    c->closed = c->freed = 0;
    c->next = all_cores.next;
    c->prev = &all_cores;
    all_cores.next->prev = c;
    all_cores.next = c;
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
    if (!c->freed)
        free_resources(c);
    Py_CLEAR(c->on_free);
    PyMem_RawFree(c->file_path);
    pthread_mutex_destroy(&c->local);
    Py_TYPE(c)->tp_free((PyObject *)c);
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
    return atomic_load_explicit(&c->pg->nonblock, memory_order_relaxed) ? -1.0 : INFINITY;
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

#define LIVE_OR_RAISE(c) do { if ((c)->freed) return closed_error(); } while (0)

static PyObject *core_peek(Core *c, PyObject *unused)
{
    (void)unused;
    LIVE_OR_RAISE(c);
    uint64_t v = atomic_load(&c->pg->counter);
    if (v > MAX_VALUE)
        return raise_result(RES_CORRUPT);
    return PyLong_FromUnsignedLongLong(v);
}

/* close(): mark closed; free now unless calls are in flight (the last one out frees).
 * True if freed now.  Never waits for another thread. */
static PyObject *core_close(Core *c, PyObject *unused)
{
    (void)unused;
    c->closed = 1;
    if (c->inflight)
        Py_RETURN_FALSE;
    if (!c->freed)
        free_resources(c);
    Py_RETURN_TRUE;
}

/* own(): in a fork child, take a private description (and an attached mark) of our own
 * now, rather than at the first locked call: the parent must see us attached. */
static PyObject *core_own(Core *c, PyObject *unused)
{
    (void)unused;
    if (!c->freed && ensure_own(c) != 0)
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
    if (!c->freed && c->carrier == CARRIER_PIPE && c->spare < 0 &&
        c->gen == atomic_load(&fork_gen) && (c->spare = open_description(c)) < 0)
        PyErr_Clear(); /* (the child then opens its own, a moment later) */
    Py_RETURN_NONE;
}

static PyObject *core_after_fork_parent(Core *c, PyObject *unused)
{
    (void)unused;
    if (c->spare >= 0)
        close(c->spare); /* the child's copy keeps the description and its mark */
    c->spare = -1;
    Py_RETURN_NONE;
}

/* reopen(): a closed core that calls in flight still keep is wanted again (an attach). */
static PyObject *core_reopen(Core *c, PyObject *unused)
{
    (void)unused;
    if (c->freed)
        Py_RETURN_FALSE;
    c->closed = 0;
    Py_RETURN_TRUE;
}

/* For asyncio: a read that never waits for the counter, and for the lock about
 * AIO_PATIENCE.  Returns the value read, or 0 if the lock stayed busy; BlockingIOError when
 * the counter is 0.  A live holder keeps the lock for a microsecond, but the aread calling
 * this has often just been woken by that holder's pipe byte, which goes in before its
 * commit: the wake-up tends to preempt the holder inside its section.  Sleeping on the lock
 * (or yielding the CPU to its holder, lock_yield) gives the holder its CPU back; returning
 * "busy" would leave the event loop to poll a readable pipe until the scheduler's next tick
 * (4 ms here).  Once a wait has timed out (a stopped holder), later calls of this process
 * try once only until one gets the lock: tasks that each waited 1 ms would stall the loop
 * for as many milliseconds as there are tasks. */
static PyObject *core_try_read(Core *c, PyObject *unused)
{
    (void)unused;
    LIVE_OR_RAISE(c);
    if (c->closed)
        return closed_error();
    uint64_t got = 0;
    Py_INCREF(c);
    int r = core_read(c, -1.0, c->stuck ? 0.0 : now() + AIO_PATIENCE, &got);
    c->stuck = r == RES_BUSY;
    Py_DECREF(c);
    if (r == RES_BUSY)
        return PyLong_FromLong(0);
    if (r != RES_OK)
        return raise_result(r);
    return PyLong_FromUnsignedLongLong(got);
}

/* try_write(value): the same for a write: True, False if the lock was busy, or raises. */
static PyObject *core_try_write(Core *c, PyObject *value)
{
    uint64_t v;
    if (convert_value(value, &v) != 0) /* (first: it may run Python code) */
        return NULL;
    LIVE_OR_RAISE(c);
    if (c->closed)
        return closed_error();
    Py_INCREF(c);
    int r = core_write(c, v, -1.0, 0.0, 1);
    Py_DECREF(c);
    if (r == RES_BUSY)
        Py_RETURN_FALSE;
    if (r != RES_OK)
        return raise_result(r);
    Py_RETURN_TRUE;
}

static PyObject *core_arm_method(Core *c, PyObject *unused)
{
    (void)unused;
    LIVE_OR_RAISE(c);
    Py_INCREF(c);
    int r = core_arm(c);
    Py_DECREF(c);
    if (r != RES_OK)
        return raise_result(r);
    Py_RETURN_NONE;
}

static PyObject *core_stats(Core *c, PyObject *unused)
{
    (void)unused;
    LIVE_OR_RAISE(c);
    struct page *p = c->pg;
    int sv[2] = {-1, -1};
#ifdef HAVE_SEM_GETVALUE
    sem_getvalue(c->sem[0], &sv[0]);
    sem_getvalue(c->sem[1], &sv[1]);
#endif
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsKsKsKsisisi}",
        "counter", (unsigned long long)atomic_load(&p->counter),
        "dirty", (unsigned long long)atomic_load(&p->dirty),
        "armed", (unsigned long long)atomic_load(&p->armed),
        "waiting_r", (unsigned long long)atomic_load(&p->waiting[READER]),
        "posted_r", (unsigned long long)atomic_load(&p->posted[READER]),
        "waiting_w", (unsigned long long)atomic_load(&p->waiting[WRITER]),
        "posted_w", (unsigned long long)atomic_load(&p->posted[WRITER]),
        "hwm", (unsigned long long)atomic_load(&p->hwm),
        "repairs", (unsigned long long)atomic_load(&p->repairs),
        "abandoned",
        (unsigned long long)(atomic_load(&c->abandoned[0]) + atomic_load(&c->abandoned[1])),
        "woken", (unsigned long long)atomic_load(&woken),
        "woken_busy", (unsigned long long)atomic_load(&woken_busy),
        "slot", c->slot, "sem_r", sv[0], "sem_w", sv[1]);
}

static PyObject *core_get_fds(Core *c, void *unused)
{
    (void)unused;
    LIVE_OR_RAISE(c);
    return Py_BuildValue("(iii)", c->fd[0], c->fd[1], c->fd[2]);
}

static PyObject *core_get_nonblocking(Core *c, void *unused)
{
    (void)unused;
    LIVE_OR_RAISE(c);
    return PyBool_FromLong((long)atomic_load(&c->pg->nonblock));
}

static int core_set_nonblocking(Core *c, PyObject *value, void *unused)
{
    (void)unused;
    int b = value ? PyObject_IsTrue(value) : -1; /* (first: it may run Python code) */
    if (b < 0)
        return -1;
    if (c->freed)
        return closed_error(), -1;
    atomic_store(&c->pg->nonblock, (uint64_t)b); /* one store, seen by every process */
    return 0;
}

static PyObject *core_get_ident(Core *c, void *unused)
{
    (void)unused;
    LIVE_OR_RAISE(c);
    return PyBytes_FromStringAndSize((const char *)c->pg->id, 16);
}

static PyObject *core_get_int(Core *c, void *which)
{
    switch ((intptr_t)which) {
    case 0: return PyBool_FromLong(c->closed);
    case 1: return PyBool_FromLong(c->freed);
    case 2: return PyBool_FromLong(c->inflight > 0);
    case 3: return PyBool_FromLong(c->semaphore);
    case 4: return Py_BuildValue("(ii)", c->mutex_kind, c->carrier);
    case 5: return PyBool_FromLong(c->alone);
    }
    return NULL;
}

static PyObject *core_get_on_free(Core *c, void *unused)
{
    (void)unused;
    return Py_NewRef(c->on_free ? c->on_free : Py_None);
}

static int core_set_on_free(Core *c, PyObject *value, void *unused)
{
    (void)unused;
    Py_XSETREF(c->on_free, Py_XNewRef(value));
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
    {"closed", (getter)core_get_int, NULL, "close() was called.", (void *)0},
    {"freed", (getter)core_get_int, NULL, "Every resource is released.", (void *)1},
    {"busy", (getter)core_get_int, NULL, "Calls are in flight.", (void *)2},
    {"semaphore", (getter)core_get_int, NULL, "EFD_SEMAPHORE, fixed at creation.", (void *)3},
    {"kind", (getter)core_get_int, NULL, "(mutex kind, carrier) from the header.", (void *)4},
    {"alone", (getter)core_get_int, NULL,
     "Freed with no other process attached: none will liveness-test after us.", (void *)5},
    {"on_free", (getter)core_get_on_free, (setter)core_set_on_free,
     "Called with the core once close() and the last call in flight have freed it.", NULL},
    {NULL}};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mpeventfd._core.Core",
    .tp_basicsize = sizeof(Core),
    .tp_dealloc = (destructor)core_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One eventfd as attached in this process (one per process and eventfd).",
    .tp_methods = core_methods,
    .tp_getset = core_getset,
    .tp_new = core_new,
};

/* -- Handle: the base of the public EventFD, its hot methods in C -------------------------- */

typedef struct {
    PyObject_HEAD
    Core *core; /* NULL once closed */
} Handle;

/* The handle's live core, or EBADF. */
static Core *live(Handle *h)
{
    Core *c = h->core;
    if (c && !c->closed)
        return c;
    closed_error();
    return NULL;
}

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
    Py_INCREF(c); /* a close() from another thread must not free the object under the call */
    until = follow_mode(c, until);
    int r = core_write(c, v, until, until, 1);
    Py_DECREF(c);
    if (r != RES_OK)
        return raise_result(r);
    Py_RETURN_NONE;
}

static PyObject *handle_read(Handle *h, PyObject *const *args, Py_ssize_t nargs, PyObject *kw)
{
    static const char *const names[] = {"timeout"};
    PyObject *timeout = NULL;
    uint64_t got = 0;
    double until;
    if (parse("read", args, nargs, kw, names, 1, &timeout) != 0 ||
        convert_timeout(timeout, &until) != 0)
        return NULL;
    Core *c = live(h);
    if (!c)
        return NULL;
    Py_INCREF(c);
    until = follow_mode(c, until);
    int r = core_read(c, until, until, &got);
    Py_DECREF(c);
    if (r != RES_OK)
        return raise_result(r);
    return PyLong_FromUnsignedLongLong(got);
}

static PyObject *handle_peek(Handle *h, PyObject *unused)
{
    Core *c = live(h);
    return c ? core_peek(c, unused) : NULL;
}

static PyObject *handle_fileno(Handle *h, PyObject *unused)
{
    (void)unused;
    Core *c = live(h);
    if (!c)
        return NULL;
    Py_INCREF(c);
    int r = core_arm(c), fd = c->fd[1], freed = c->freed;
    Py_DECREF(c);
    if (r != RES_OK)
        return raise_result(r);
    if (freed)
        return closed_error();
    return PyLong_FromLong(fd);
}

static void handle_dealloc(Handle *h)
{
    Py_CLEAR(h->core);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

static PyObject *handle_get_core(Handle *h, void *unused)
{
    (void)unused;
    return Py_NewRef(h->core ? (PyObject *)h->core : Py_None);
}

static int handle_set_core(Handle *h, PyObject *value, void *unused)
{
    (void)unused;
    if (value && value != Py_None && !PyObject_TypeCheck(value, &CoreType)) {
        PyErr_SetString(PyExc_TypeError, "_core must be a Core or None");
        return -1;
    }
    Py_XSETREF(h->core, value && value != Py_None ? (Core *)Py_NewRef(value) : NULL);
    return 0;
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
     "    OSError: EBADF if the handle is closed.\n"},
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
    {NULL}};

static PyGetSetDef handle_getset[] = {
    {"_core", (getter)handle_get_core, (setter)handle_set_core, "The attached core.", NULL},
    {NULL}};

static PyTypeObject HandleType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mpeventfd._core.Handle",
    .tp_basicsize = sizeof(Handle),
    .tp_dealloc = (destructor)handle_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Base of mpeventfd.EventFD: the operations that are one C call each.",
    .tp_methods = handle_methods,
    .tp_getset = handle_getset,
    .tp_new = PyType_GenericNew,
};

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
    memcpy(p->id, id.buf, 16);
    PyBuffer_Release(&id);
    p->version = VERSION;
    p->size = PAGE_BYTES;
    p->semaphore = (uint64_t)semaphore;
    p->mutex_kind = (uint64_t)mutex_kind;
    p->carrier = (uint64_t)carrier;
    p->creator = (uint64_t)getpid();
    p->pipe_dev = pipe_dev;
    p->pipe_ino = pipe_ino;
    p->nslots = NSLOTS;
    atomic_store(&p->counter, initval);
    atomic_store(&p->nonblock, (uint64_t)nonblock);
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
        atomic_store_explicit((_Atomic uint64_t *)&p->magic, MAGIC, memory_order_release);
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
    if (pwrite(fd, w, 16, offsetof(struct page, sem_ino)) != 16 ||
        pwrite(fd, w + 2, 16, offsetof(struct page, file_dev)) != 16)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* read_header(fd) -> dict: a state file's header read by pread and validated (attach). */
static PyObject *mod_read_header(PyObject *mod, PyObject *arg)
{
    (void)mod;
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    struct page h;
    struct stat st;
    ssize_t n, want = (ssize_t)offsetof(struct page, pad1);
    Py_BEGIN_ALLOW_THREADS
    n = fstat((int)fd, &st) == 0 ? pread((int)fd, &h, (size_t)want, 0) : -1;
    Py_END_ALLOW_THREADS
    if (n < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (n != want)
        return PyErr_Format(StateError, "the state file is too short");
    if (check_header(&h, st.st_size) != 0)
        return NULL;
    return Py_BuildValue(
        "{sy#sKsisisisisKsKsKsKsKsK}", "id", (const char *)h.id, (Py_ssize_t)16,
        "counter", (unsigned long long)h.counter, "nonblock", (int)h.nonblock,
        "semaphore", (int)h.semaphore, "mutex_kind", (int)h.mutex_kind,
        "carrier", (int)h.carrier, "pipe_dev", (unsigned long long)h.pipe_dev,
        "pipe_ino", (unsigned long long)h.pipe_ino,
        "sem_r_ino", (unsigned long long)h.sem_ino[0],
        "sem_w_ino", (unsigned long long)h.sem_ino[1],
        "file_dev", (unsigned long long)h.file_dev, "file_ino", (unsigned long long)h.file_ino);
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
    fault_countdown = nth;
    fault_step = step;
    Py_RETURN_NONE;
}

/* _spin(seconds): how long a blocking normal-mode read watches the counter (bench, tests). */
static PyObject *mod_spin(PyObject *mod, PyObject *arg)
{
    (void)mod;
    double old = spin_seconds, t = PyFloat_AsDouble(arg);
    if (t == -1.0 && PyErr_Occurred())
        return NULL;
    if (!(t >= 0 && t <= 0.01))
        return PyErr_Format(PyExc_ValueError, "spin must be within 0..10 ms");
    spin_seconds = t;
    return PyFloat_FromDouble(old);
}

static PyObject *mod_disarm(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    fault_step = STEP_NONE;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"init_page", mod_init_page, METH_VARARGS, "Write a fresh header into a state file."},
    {"set_identity", mod_set_identity, METH_VARARGS, "Record the semaphores' and lock file's identity."},
    {"read_header", mod_read_header, METH_O, "Read and validate a state file's header."},
    {"_arm", mod_arm, METH_VARARGS, "Arm a fault at a named step (tests only)."},
    {"_disarm", mod_disarm, METH_NOARGS, "Disarm the fault hook."},
    {"_spin", mod_spin, METH_O, "Set the read spin (seconds); returns the old one."},
    {NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "mpeventfd._core",
    "The critical sections of mpeventfd, each one C call (see docs/design.md).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__core(void)
{
    if (PyType_Ready(&CoreType) < 0 || PyType_Ready(&HandleType) < 0)
        return NULL;
    PyObject *errors = PyImport_ImportModule("mpeventfd._errors");
    if (!errors)
        return NULL;
    StateError = PyObject_GetAttrString(errors, "StateError");
    Py_DECREF(errors);
    if (!StateError)
        return NULL;
    PyObject *threading = PyImport_ImportModule("threading");
    PyObject *main = threading ? PyObject_CallMethod(threading, "main_thread", NULL) : NULL;
    PyObject *ident = main ? PyObject_GetAttrString(main, "ident") : NULL;
    Py_XDECREF(threading);
    Py_XDECREF(main);
    if (!ident)
        return NULL;
    main_ident = PyLong_AsUnsignedLong(ident);
    Py_DECREF(ident);
    all_cores.next = all_cores.prev = &all_cores;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        cpus = CPU_COUNT(&set);
#endif
    spin_seconds = cpus > 1 ? SPIN_READ : 0.0;
    lock_cpus = (int)cpus;
    if (pthread_atfork(NULL, NULL, after_fork_child) != 0)
        return PyErr_Format(PyExc_RuntimeError, "pthread_atfork failed");
    PyObject *m = PyModule_Create(&module);
    PyObject *steps = PyTuple_New(NSTEPS);
    if (!m || !steps)
        goto fail;
    for (int i = 0; i < NSTEPS; i++)
        PyTuple_SET_ITEM(steps, i, PyUnicode_FromString(step_names[i]));
    struct { const char *name; long long v; } ints[] = {
        {"SIZE", (long long)PAGE_BYTES}, {"NSLOTS", NSLOTS},
        {"MUTEX_ROBUST", MUTEX_ROBUST}, {"MUTEX_BYTE", MUTEX_BYTE},
        {"CARRIER_PIPE", CARRIER_PIPE}, {"CARRIER_FILE", CARRIER_FILE},
        {"OFFSET_COUNTER", offsetof(struct page, counter)},
        {"OFFSET_NONBLOCK", offsetof(struct page, nonblock)},
        {"OFFSET_DIRTY", offsetof(struct page, dirty)},
        {"OFFSET_ARMED", offsetof(struct page, armed)},
        {"OFFSET_HWM", offsetof(struct page, hwm)},
        {"OFFSET_SEMAPHORE", offsetof(struct page, semaphore)},
        {"OFFSET_MUTEX_KIND", offsetof(struct page, mutex_kind)},
        {"OFFSET_CARRIER", offsetof(struct page, carrier)},
        {"OFFSET_VERSION", offsetof(struct page, version)},
        {"OFFSET_MAGIC", offsetof(struct page, magic)},
        {"OFFSET_NSLOTS", offsetof(struct page, nslots)},
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
            goto fail;
    if (PyModule_AddObject(m, "STEPS", steps) != 0)
        goto fail;
    steps = NULL;
    if (PyModule_AddObjectRef(m, "Core", (PyObject *)&CoreType) != 0 ||
        PyModule_AddObjectRef(m, "Handle", (PyObject *)&HandleType) != 0 ||
        PyModule_AddObject(m, "MAX_VALUE", PyLong_FromUnsignedLongLong(MAX_VALUE)) != 0)
        goto fail;
    return m;
fail:
    Py_XDECREF(steps);
    Py_XDECREF(m);
    return NULL;
}
