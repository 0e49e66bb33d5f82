"""Run `python SCRIPT ARGS` without paying the interpreter and torch start-up each time.

Most of the suite's time used to go to starting Python and importing torch (~4 s a run) for
each of the many train.py / sample.py / eval.py runs. `run_script` instead forks a server
process that has already imported the heavy third-party packages (torch, numpy, ...) but
nothing of this project and has run no torch computation. Each run is its own forked process:
fresh RNG, thread settings, sys.modules of the project, cwd, environment, signal handlers and
excepthook, so no state leaks between runs and the order of the tests does not matter. The
child runs the script as the interpreter would (runpy as __main__, sys.argv, sys.path[0] the
script's folder, an uncaught exception or SystemExit handled by Python itself), writing to its
own stdout/stderr files; its exit status is the process's. Multi-process runs (torchrun) and
environments that change what the interpreter reads at start-up still start a fresh Python."""

import atexit
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

# read when an interpreter (or torch's OpenMP) starts: a run that sets these differently
# from the server gets a fresh interpreter instead of a fork
STARTUP_VARS = ("PYTHON", "OMP_", "MKL_", "KMP_", "LD_", "CUDA", "TORCH", "GOMP_")
# ... except these, read only when compiling: torch sets the first in the tests' own process
# the first time a model is built, which must not send every later run to a fresh interpreter
READ_LATER = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
# what the scripts import that costs seconds; none of it computes or starts a thread at import
WARM_IMPORTS = ("torch", "torch._dynamo", "torch.distributed", "torch.nn.parallel", "torch.utils.checkpoint", "numpy", "tqdm",
                "regex", "tiktoken", "safetensors", "yaml", "matplotlib")
SERVER_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # what every test's run sets


def _startup(env):
    return {k: v for k, v in env.items() if k.startswith(STARTUP_VARS) and k not in READ_LATER}


class _Server:
    """The warmed-up process that forks one child per run (see the module docstring)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="script_runner_")
        self.log = open(os.path.join(self.dir, "server.log"), "w")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=SERVER_ENV, bufsize=0)
        self.pending, self.count = b"", 0

    def readline(self, deadline):
        """One reply line from the server; None when the deadline passes first."""
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("the script server died: " + open(self.log.name).read()[-2000:])
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode()

    def run(self, argv, cwd, env, timeout):
        self.count += 1
        out, err = (os.path.join(self.dir, f"{self.count}.{name}") for name in ("out", "err"))
        job = {"argv": argv, "cwd": os.fspath(cwd), "env": env, "stdout": out, "stderr": err}
        self.proc.stdin.write((repr(job) + "\n").encode())
        deadline = time.monotonic() + (timeout or 1e9)
        pid = int(self.readline(deadline))
        status = self.readline(deadline)
        if status is None:  # what subprocess.run does on a timeout: kill the run, raise
            os.kill(pid, 9)
            self.readline(time.monotonic() + 60)
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout)
        with open(out) as f_out, open(err) as f_err:
            result = subprocess.CompletedProcess([sys.executable, *argv], int(status), f_out.read(), f_err.read())
        os.remove(out), os.remove(err)
        return result

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_server = None


def run_script(argv, cwd, env=None, timeout=None):
    """subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
    timeout=timeout), forked from a warm interpreter (argv: a script and its arguments, or
    "-c", code, arguments). Falls back to that very subprocess.run when env changes start-up."""
    global _server
    env = dict(os.environ if env is None else env)
    if _startup(env) != _startup(SERVER_ENV):  # (slow: say so, in pytest's warnings summary)
        changed = sorted(set(_startup(env).items()) ^ set(_startup(SERVER_ENV).items()))
        warnings.warn(f"a fresh interpreter for {argv[0]}: start-up variables {sorted({k for k, _ in changed})}")
        return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    if _server is None or _server.proc.poll() is not None:
        _server = _Server()
        atexit.register(_server.close)
    return _server.run(list(map(os.fspath, argv)), cwd, env, timeout)


def _serve():
    """Server side: read one job a line; fork; reply the child's pid, then its exit status. The
    child returns the job to run (it leaves this loop, so nothing of the server runs after it)."""
    import ast
    import gc
    import importlib
    for name in WARM_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional package: the script will say so itself
            pass
    # the imports' objects out of the collector's sight: a child's collections (and its exit)
    # would otherwise touch, and so copy, every page of them (~2 s a run on a busy machine)
    gc.freeze()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        job = ast.literal_eval(line)
        pid = os.fork()
        if pid == 0:
            replies.close()
            return job
        replies.write(f"{pid}\n")
        _, status = os.waitpid(pid, 0)
        replies.write(f"{os.waitstatus_to_exitcode(status)}\n")
    raise SystemExit(0)


if __name__ == "__main__":
    _job = _serve()
    # the child: become `python ARGV` in the job's folder, environment and output files
    import runpy
    os.chdir(_job["cwd"])
    os.environ.clear()
    os.environ.update(_job["env"])
    for _fd, _path, _mode in ((0, os.devnull, os.O_RDONLY), (1, _job["stdout"], os.O_WRONLY | os.O_CREAT),
                              (2, _job["stderr"], os.O_WRONLY | os.O_CREAT)):
        _new = os.open(_path, _mode)
        os.dup2(_new, _fd)
        os.close(_new)
    if _job["argv"][0] == "-c":
        sys.argv, sys.path[0] = ["-c", *_job["argv"][2:]], ""
        _code, _job = _job["argv"][1], None
        exec(compile(_code, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    else:
        sys.argv, sys.path[0] = list(_job["argv"]), os.path.dirname(os.path.abspath(_job["argv"][0]))
        _job = None
        runpy.run_path(os.path.abspath(sys.argv[0]), run_name="__main__")
