/* Start a replayed command that dies with the process that started it, at the cost of a plain
 * spawn.
 *
 * The contract wants every replayed command to die with its pool child (a parent-death
 * signal). Python can arm one in the new process only through a preexec_fn, which forces a full
 * fork of the interpreter, or through exec wrappers (setpriv, then sh to check the parent),
 * which cost two more execs per job. Here the new process arms it itself between vfork and
 * exec: setsid, PR_SET_PDEATHSIG SIGKILL, then a check that its parent is still the caller (a
 * parent killed before the signal was armed would never send it), then its working directory,
 * its standard streams and the exec. A failure before the exec comes back through a
 * close-on-exec pipe as (step, errno) and is raised as OSError. Linux only; the package falls
 * back to the exec wrappers where this module is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

enum { STEP_PARENT = 1, STEP_CHDIR = 2, STEP_STREAMS = 3, STEP_EXEC = 4, STEP_SETUP = 5 };

/* The bytes of `obj` as a C string; ValueError if it holds a NUL (the C string would stop
 * there: another command than the one recorded). */
static const char *c_string(PyObject *obj, const char *what)
{
    if (!PyBytes_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes", what);
        return NULL;
    }
    const char *s = PyBytes_AS_STRING(obj);
    if (strlen(s) != (size_t)PyBytes_GET_SIZE(obj)) {
        PyErr_Format(PyExc_ValueError, "embedded null byte in %s", what);
        return NULL;
    }
    return s;
}

/* A NULL-terminated array of the items of a sequence of bytes (borrowed pointers, kept alive
 * by `keep`, which the caller releases). */
static char **to_vector(PyObject *seq, PyObject **keep, const char *what)
{
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    char **vec = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (vec == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *item = c_string(PySequence_Fast_GET_ITEM(fast, i), what);
        if (item == NULL) {
            PyMem_Free(vec);
            Py_DECREF(fast);
            return NULL;
        }
        vec[i] = (char *)item;
    }
    *keep = fast;
    return vec;
}

/* `fd` itself, or a close-on-exec copy of it at 3 or above (*made = 1), so that putting the
 * streams at 0, 1 and 2 in the child never overwrites one it still needs. */
static int above_streams(int fd, int *made)
{
    *made = 0;
    if (fd > 2)
        return fd;
    int copy = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (copy >= 0)
        *made = 1;
    return copy;
}

/* Close every descriptor from 3 on except `keep` (most are close-on-exec already). */
static void close_others(int keep)
{
#ifdef SYS_close_range
    int ok = 1;
    if (keep > 3 && syscall(SYS_close_range, 3, keep - 1, 0) < 0)
        ok = 0;
    if (ok && syscall(SYS_close_range, keep + 1, ~0U, 0) == 0)
        return;
#endif
    /* No close_range (a kernel before 5.9, or a seccomp filter): one close per descriptor. */
    struct rlimit limit;
    long top = 65536;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY
        && (long)limit.rlim_cur < top)
        top = (long)limit.rlim_cur;
    for (long fd = 3; fd < top; fd++)
        if (fd != keep)
            close((int)fd);
}

/* In the new process: only async-signal-safe calls, and nothing but _exit after a failure. */
static void __attribute__((noreturn)) child(const char *path, char *const argv[], char *const envp[], const char *cwd,
                  int in_fd, int out_fd, int err_pipe, pid_t parent, const sigset_t *old_mask)
{
    int step = STEP_SETUP;
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    /* The caller's Python signal handlers must not run here: back to the defaults. Ignored
     * signals stay ignored across the exec, except those Python itself ignores (what
     * subprocess's restore_signals does). */
    for (int sig = 1; sig < NSIG; sig++) {
        struct sigaction old;
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        if (sigaction(sig, NULL, &old) < 0 || old.sa_handler == SIG_DFL)
            continue;
        if (old.sa_handler != SIG_IGN || sig == SIGPIPE || sig == SIGXFSZ)
            sigaction(sig, &dfl, NULL);
    }
    if (setsid() < 0)
        goto fail;
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
        goto fail;
    step = STEP_PARENT;
    if (getppid() != parent) {
        errno = ESRCH;
        goto fail;
    }
    step = STEP_CHDIR;
    if (cwd != NULL && chdir(cwd) < 0)
        goto fail;
    step = STEP_STREAMS; /* both above 2 (above_streams): dup2 never sees equal descriptors */
    if (dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(out_fd, 2) < 0)
        goto fail;
    /* The error pipe stays: close-on-exec, its closing tells the caller the exec happened. */
    close_others(err_pipe);
    sigprocmask(SIG_SETMASK, old_mask, NULL);
    step = STEP_EXEC;
    execve(path, argv, envp);
fail:;
    int report[2] = {step, errno};
    ssize_t unused = write(err_pipe, report, sizeof report);
    (void)unused;
    _exit(127);
}

/* Only this frame is shared with the child, which never returns into it (as in CPython's
 * _posixsubprocess): nothing of the caller's is live across the vfork. */
static pid_t __attribute__((noinline))
fork_child(const char *path, char **argv, char **envp, const char *cwd, int in_fd, int out_fd,
           int err_pipe, pid_t parent, const sigset_t *old_mask)
{
    pid_t pid = vfork();
    if (pid == 0)
        child(path, argv, envp, cwd, in_fd, out_fd, err_pipe, parent, old_mask);
    return pid;
}

/* vfork, run `child`, and wait for its exec: the pid, or -1 with the failed step and errno. */
static pid_t start(const char *path, char **argv, char **envp, const char *cwd, int in_fd,
                   int out_fd, pid_t parent, int report[2])
{
    int err_pipe[2], made[3] = {0, 0, 0};
    report[0] = STEP_SETUP;
    if (pipe2(err_pipe, O_CLOEXEC) < 0) {
        report[1] = errno;
        return -1;
    }
    int in2 = above_streams(in_fd, &made[0]);
    int out2 = above_streams(out_fd, &made[1]);
    int err2 = above_streams(err_pipe[1], &made[2]);
    pid_t pid = -1;
    if (in2 < 0 || out2 < 0 || err2 < 0) {
        report[1] = errno;
        goto cleanup;
    }
    sigset_t all, old_mask;
    sigfillset(&all);
    /* Signals are blocked across vfork: no handler may run in the child while it borrows our
     * memory; it restores the mask right before its exec. */
    pthread_sigmask(SIG_SETMASK, &all, &old_mask);
    pid = fork_child(path, argv, envp, cwd, in2, out2, err2, parent, &old_mask);
    int saved = errno;
    pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
    if (pid < 0) {
        report[1] = saved;
        goto cleanup;
    }
    close(err_pipe[1]);
    err_pipe[1] = -1;
    if (made[2]) {
        close(err2);
        made[2] = 0;
    }
    ssize_t got;
    do {
        got = read(err_pipe[0], report, 2 * sizeof(int));
    } while (got < 0 && errno == EINTR);
    if (got > 0) { /* the exec did not happen: reap the child, report why */
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
        pid = -1;
    }
cleanup:
    if (made[0])
        close(in2);
    if (made[1])
        close(out2);
    if (made[2])
        close(err2);
    if (err_pipe[1] >= 0)
        close(err_pipe[1]);
    close(err_pipe[0]);
    return pid;
}

static PyObject *spawn(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *path_obj, *argv_obj, *env_obj, *cwd_obj;
    int in_fd, out_fd;
    long parent;
    if (!PyArg_ParseTuple(args, "OOOOiil", &path_obj, &argv_obj, &env_obj, &cwd_obj, &in_fd,
                          &out_fd, &parent))
        return NULL;
    const char *path = c_string(path_obj, "path");
    if (path == NULL)
        return NULL;
    const char *cwd = NULL;
    if (cwd_obj != Py_None && (cwd = c_string(cwd_obj, "cwd")) == NULL)
        return NULL;
    PyObject *keep_argv = NULL, *keep_env = NULL;
    char **argv = to_vector(argv_obj, &keep_argv, "argv");
    if (argv == NULL)
        return NULL;
    char **envp = to_vector(env_obj, &keep_env, "env");
    if (envp == NULL) {
        PyMem_Free(argv);
        Py_DECREF(keep_argv);
        return NULL;
    }
    int report[2];
    pid_t pid;
    /* Other threads may run meanwhile: the child touches nothing of Python's. */
    Py_BEGIN_ALLOW_THREADS
    pid = start(path, argv, envp, cwd, in_fd, out_fd, (pid_t)parent, report);
    Py_END_ALLOW_THREADS
    PyMem_Free(argv);
    PyMem_Free(envp);
    Py_DECREF(keep_argv);
    Py_DECREF(keep_env);
    if (pid >= 0)
        return PyLong_FromLong((long)pid);
    if (report[0] == STEP_PARENT) {
        PyErr_SetString(PyExc_ChildProcessError, "the spawning process changed");
        return NULL;
    }
    errno = report[1];
    if (report[0] == STEP_CHDIR)
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, cwd_obj);
    if (report[0] == STEP_EXEC)
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path_obj);
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyMethodDef methods[] = {
    {"spawn", spawn, METH_VARARGS,
     "spawn(path, argv, env, cwd, stdin_fd, stdout_fd, parent) -> pid\n\n"
     "Exec `path` in a new session whose parent-death signal is SIGKILL, with `stdin_fd` as\n"
     "its standard input and `stdout_fd` as its standard output and error. Arguments are\n"
     "bytes (ValueError if one holds a NUL). Raises OSError when the command could not start\n"
     "(filename: cwd when entering it failed, path when the exec failed), ChildProcessError\n"
     "when `parent` is not the new process's parent."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_spawn", "A spawn that arms the parent-death signal.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__spawn(void) { return PyModule_Create(&module); }
