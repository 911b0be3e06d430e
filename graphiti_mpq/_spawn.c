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
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

enum { STEP_PARENT = 1, STEP_CHDIR = 2, STEP_STREAMS = 3, STEP_EXEC = 4, STEP_SETUP = 5 };

/* A NULL-terminated array of the bytes of each item of a sequence (borrowed pointers, kept
 * alive by `keep`, which the caller releases). */
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
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyBytes_Check(item)) {
            PyErr_Format(PyExc_TypeError, "%s: every item must be bytes", what);
            PyMem_Free(vec);
            Py_DECREF(fast);
            return NULL;
        }
        vec[i] = PyBytes_AS_STRING(item);
    }
    *keep = fast;
    return vec;
}

/* In the new process: only async-signal-safe calls, and nothing but _exit after a failure. */
static void child(const char *path, char *const argv[], char *const envp[], const char *cwd,
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
    step = STEP_STREAMS;
    if (dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(out_fd, 2) < 0)
        goto fail;
#ifdef SYS_close_range
    /* Nothing else of the caller's leaks into the command (most are close-on-exec anyway);
     * the error pipe is kept: close-on-exec, it tells the caller that the exec happened. */
    if (err_pipe > 3)
        syscall(SYS_close_range, 3, err_pipe - 1, 0);
    syscall(SYS_close_range, err_pipe + 1, ~0U, 0);
#endif
    sigprocmask(SIG_SETMASK, old_mask, NULL);
    step = STEP_EXEC;
    execve(path, argv, envp);
fail:;
    int report[2] = {step, errno};
    ssize_t unused = write(err_pipe, report, sizeof report);
    (void)unused;
    _exit(127);
}

static PyObject *spawn(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *path_obj, *argv_obj, *env_obj, *cwd_obj;
    int in_fd, out_fd;
    long parent;
    if (!PyArg_ParseTuple(args, "SOOOiil", &path_obj, &argv_obj, &env_obj, &cwd_obj, &in_fd,
                          &out_fd, &parent))
        return NULL;
    const char *cwd = NULL;
    if (cwd_obj != Py_None) {
        if (!PyBytes_Check(cwd_obj)) {
            PyErr_SetString(PyExc_TypeError, "cwd must be bytes or None");
            return NULL;
        }
        cwd = PyBytes_AS_STRING(cwd_obj);
    }
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
    PyObject *result = NULL;
    int err_pipe[2];
    if (pipe2(err_pipe, O_CLOEXEC) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    sigset_t all, old_mask;
    sigfillset(&all);
    const char *path = PyBytes_AS_STRING(path_obj);
    pid_t pid;
    int saved;
    /* Signals are blocked across vfork: no handler may run in the child while it borrows our
     * memory; it restores the mask right before its exec. Other threads may run meanwhile:
     * the child touches nothing of Python's. */
    Py_BEGIN_ALLOW_THREADS
    pthread_sigmask(SIG_SETMASK, &all, &old_mask);
    pid = vfork();
    if (pid == 0)
        child(path, argv, envp, cwd, in_fd, out_fd, err_pipe[1], (pid_t)parent, &old_mask);
    saved = errno;
    pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
    Py_END_ALLOW_THREADS
    close(err_pipe[1]);
    if (pid < 0) {
        close(err_pipe[0]);
        errno = saved;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    int report[2] = {0, 0};
    ssize_t got;
    Py_BEGIN_ALLOW_THREADS
    do {
        got = read(err_pipe[0], report, sizeof report);
    } while (got < 0 && errno == EINTR);
    Py_END_ALLOW_THREADS
    close(err_pipe[0]);
    if (got <= 0) { /* closed by a successful exec */
        result = PyLong_FromLong((long)pid);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
        ;
    Py_END_ALLOW_THREADS
    if (report[0] == STEP_PARENT) {
        PyErr_SetString(PyExc_ChildProcessError, "the spawning process changed");
        goto done;
    }
    PyObject *filename = report[0] == STEP_CHDIR ? cwd_obj : path_obj;
    errno = report[1];
    PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, filename);
done:
    PyMem_Free(argv);
    PyMem_Free(envp);
    Py_DECREF(keep_argv);
    Py_DECREF(keep_env);
    return result;
}

static PyMethodDef methods[] = {
    {"spawn", spawn, METH_VARARGS,
     "spawn(path, argv, env, cwd, stdin_fd, stdout_fd, parent) -> pid\n\n"
     "Exec `path` in a new session whose parent-death signal is SIGKILL, with `stdin_fd` as\n"
     "its standard input and `stdout_fd` as its standard output and error. Arguments are\n"
     "bytes. Raises OSError (filename: cwd or path) when the command could not start."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_spawn", "A spawn that arms the parent-death signal.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__spawn(void) { return PyModule_Create(&module); }
