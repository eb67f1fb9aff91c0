"""Generation tasks: GSM8K exact match and HumanEval pass@1, with the sandbox that runs the programs.

Decoding is greedy, through the engine only: `GreedyGenerator` hands every prompt to one `dsv3.LLM`
(continuous batching over the paged latent cache). Prompts are encoded with the tokenizer's special
tokens (BOS); a prompt too long for the window keeps its first token and its tail. Text is cut before
the first stop string.

GSM8K: the answer is the number after the last "answer is" (the few-shot format: "So the answer is
18."), else after "####", else the last number in the text; commas, "$" and a trailing "." are dropped
and numbers compare by value.

HumanEval: program = prompt + completion + test + `check(entry_point)`, run by `run_programs`, never in
this process. Each program runs in `python -I -B` in its own temporary folder (its cwd, HOME and
TMPDIR), in a new session (so the whole process group is killed at the wall-time limit), with
`resource.setrlimit` in `preexec_fn`: address space (`memory_mb`), CPU seconds, file size, no core
dumps. Before the program starts, a Python audit hook (which cannot be removed) refuses: opening a file
for writing, creating, removing, renaming or changing anything outside the temporary folder; starting
processes (fork, exec, spawn, subprocess, os.system), signalling other processes, loading native code
with ctypes, and opening network sockets. This guards against accidents of generated code; it is not
a boundary against code written to escape (run untrusted models in a container).
"""

from __future__ import annotations

import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tqdm.auto import tqdm

from dsv3.eval.tasks import Gsm8kItem, HumanEvalItem

if TYPE_CHECKING:
    from dsv3.engine.config import EngineConfig

__all__ = ["extract_gsm8k_answer", "normalize_number", "gsm8k_match", "GreedyGenerator", "cut_at_stop",
           "evaluate_gsm8k", "ExecResult", "run_programs", "humaneval_program", "evaluate_humaneval",
           "pass_at_k"]

GenerateFn = Callable[[Sequence[str], int, Sequence[str]], list[str]]


# ---- GSM8K answers ----------------------------------------------------------------------------
_NUM = r"-?[\d,]*\.?\d+"
_ANSWER_IS = re.compile(r"answer is\s*:?\s*\$?\s*(-?\s?" + _NUM[2:] + ")", re.IGNORECASE)  # "is - 10."
_HASHES = re.compile(r"####\s*\$?\s*(" + _NUM + ")")
_NUMBER = re.compile(_NUM)


def normalize_number(text: str) -> str:
    """'1,234.00' -> '1234', '$18.' -> '18', '- 0.50' -> '-0.5'; non-numbers come back without spaces."""
    s = re.sub(r"[\s,$]", "", text).rstrip(".")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return s
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_gsm8k_answer(text: str) -> str | None:
    """The final number of a GSM8K answer (normalised), or None when the text has no number."""
    for pattern in (_ANSWER_IS, _HASHES):
        found = pattern.findall(text)
        if found:
            return normalize_number(found[-1])
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_match(generated: str, gold: str) -> bool:
    answer = extract_gsm8k_answer(generated)
    return answer is not None and answer == normalize_number(gold)


# ---- greedy decoding --------------------------------------------------------------------------
def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


class GreedyGenerator:
    """Greedy completion of text prompts through the engine: `gen(prompts, max_new_tokens, stop) -> texts`.

    The `LLM` is built on first use around `model` (as is: its device and dtype), with `config` for the
    cache and batch settings (default: `EngineConfig()`); prompts too long for the window keep their
    first token and their tail."""

    def __init__(self, model: Any, tokenizer: Any, max_len: int | None = None, progress: bool = True,
                 config: EngineConfig | None = None) -> None:
        self.model, self.tokenizer, self.progress, self.config = model, tokenizer, progress, config
        self.max_len = min(max_len or model.args.max_seq_len, model.args.max_seq_len)
        self._llm: Any = None

    def _prompt_ids(self, prompt: str, room: int) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        if len(ids) > room:
            ids = ids[:1] + ids[len(ids) - room + 1:]
        return ids

    @property
    def llm(self) -> Any:
        """The engine, built on first use."""
        if self._llm is None:
            from dsv3.engine.llm import LLM
            self._llm = LLM(self.model, tokenizer=self.tokenizer, config=self.config)
        return self._llm

    def __call__(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        from dsv3.engine.sampling import SamplingParams

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        limit = min(self.max_len, self.llm.max_model_len)
        if max_new_tokens >= limit:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be below the window ({limit})")
        ids = [self._prompt_ids(p, limit - max_new_tokens) for p in prompts]
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=list(stop) or None)
        outs = self.llm.generate(ids, params, use_tqdm=self.progress)
        return [cut_at_stop(o.text, stop) for o in outs]


def evaluate_gsm8k(generate: GenerateFn, items: Sequence[Gsm8kItem],
                   max_new_tokens: int = 256) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Exact match of the extracted final number."""
    from dsv3.eval.multiple_choice import stderr

    if not items:
        raise ValueError("no items to evaluate")
    texts = generate([it.prompt for it in items], max_new_tokens, items[0].stop)
    hits, records = [], []
    for it, text in zip(items, texts):
        pred = extract_gsm8k_answer(text)
        hit = pred is not None and pred == normalize_number(it.answer)
        hits.append(float(hit))
        records.append({"id": it.id, "gold": it.answer, "pred": pred, "correct": hit, "generation": text})
    return {"exact_match": sum(hits) / len(hits), "exact_match_stderr": stderr(hits), "n": len(items)}, records


# ---- sandboxed execution ----------------------------------------------------------------------
# Runs in the child before the program: installs the audit hook, then runs the program file.
_GUARD = r'''
import os, sys, runpy
ROOT = os.path.realpath(os.getcwd())
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATHS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.chmod": (0,),
         "os.chown": (0,), "os.chflags": (0,), "os.link": (1,), "os.symlink": (1,), "os.truncate": (0,),
         "os.utime": (0,), "os.setxattr": (0,), "os.removexattr": (0,), "os.mkfifo": (0,),
         "os.mknod": (0,), "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.copymode": (1,),
         "shutil.copystat": (1,), "shutil.copytree": (1,), "shutil.move": (0, 1), "shutil.chown": (0,),
         "shutil.make_archive": (0,), "shutil.unpack_archive": (1,)}
DENY = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
        "os.startfile", "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function",
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "os.setuid", "os.chroot"}
busy = []

def inside(path):
    if isinstance(path, int) or path is None:
        return True
    p = os.fsdecode(path)
    p = os.path.realpath(p if os.path.isabs(p) else os.path.join(os.getcwd(), p))
    return p == ROOT or p.startswith(ROOT + os.sep)

def hook(event, args):
    if busy:
        return
    busy.append(1)
    try:
        if event in DENY:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            if (flags & WRITE or any(c in mode for c in "wax+")) and not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside {ROOT}")
        elif event in PATHS:
            for i in PATHS[event]:
                if i < len(args) and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside {ROOT}")
    finally:
        busy.pop()

sys.addaudithook(hook)
program = sys.argv[1]
del sys.argv[0]
runpy.run_path(program, run_name="__main__")
'''

OUTPUT_LIMIT = 16 * 2**20  # bytes any one file (stdout and stderr included) may reach


@dataclass
class ExecResult:
    status: str  # "passed" | "failed" | "timeout" | "memory"
    returncode: int | None
    seconds: float
    stderr: str  # last 2,000 characters

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(memory_bytes: int, cpu_seconds: int) -> Callable[[], None]:
    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_LIMIT, OUTPUT_LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


class _Job:
    """One running program: its folder, process, deadline and output files."""

    def __init__(self, source: str, timeout: float, memory_mb: int) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="dsv3-exec-")
        root = Path(self.dir.name)
        (root / "_guard.py").write_text(_GUARD, encoding="utf-8")
        (root / "program.py").write_text(source, encoding="utf-8")
        self.out = open(root / "_stdout.txt", "wb")
        self.err = open(root / "_stderr.txt", "wb")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "TMPDIR": str(root), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0"}
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "_guard.py", "program.py"], cwd=root, env=env,
            stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.err, start_new_session=True,
            preexec_fn=_limits(memory_mb * 2**20, max(1, math.ceil(timeout)) + 1))

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def finish(self, timed_out: bool) -> ExecResult:
        seconds = time.monotonic() - self.start
        self.out.close()
        self.err.close()
        err = (Path(self.dir.name) / "_stderr.txt").read_bytes()[-2000:].decode("utf-8", "replace")
        self.dir.cleanup()
        rc = self.proc.returncode
        if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
            status = "timeout" if timed_out or rc == -signal.SIGXCPU else "memory"
        elif "MemoryError" in err:
            status = "memory"
        else:
            status = "passed" if rc == 0 else "failed"
        return ExecResult(status, rc, seconds, err)


def run_programs(sources: Sequence[str], timeout: float = 5.0, memory_mb: int = 1024, workers: int = 4,
                 progress: bool = False, desc: str = "executing") -> list[ExecResult]:
    """Run each Python source in its own sandboxed subprocess, `workers` at a time (one thread polls)."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be >= 64, got {memory_mb}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    results: list[ExecResult | None] = [None] * len(sources)
    pending = list(range(len(sources)))[::-1]
    running: dict[int, _Job] = {}
    try:
        with tqdm(total=len(sources), desc=desc, unit="prog", disable=not progress, leave=False) as bar:
            while pending or running:
                while pending and len(running) < workers:
                    i = pending.pop()
                    running[i] = _Job(sources[i], timeout, memory_mb)
                for i, job in list(running.items()):
                    if job.proc.poll() is not None:
                        results[i] = job.finish(timed_out=False)
                    elif time.monotonic() > job.deadline:
                        job.kill()
                        results[i] = job.finish(timed_out=True)
                    else:
                        continue
                    del running[i]
                    bar.update(1)
                time.sleep(0.005)
    finally:  # an error or Ctrl-C here leaves no program running
        for job in running.values():
            job.kill()
            job.finish(timed_out=True)
    return results  # type: ignore[return-value]


# ---- HumanEval --------------------------------------------------------------------------------
def humaneval_program(item: HumanEvalItem, completion: str) -> str:
    return f"{item.prompt}{completion}\n{item.test}\ncheck({item.entry_point})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def evaluate_humaneval(generate: GenerateFn, items: Sequence[HumanEvalItem], max_new_tokens: int = 512,
                       timeout: float = 5.0, memory_mb: int = 1024, workers: int = 4,
                       progress: bool = True) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Greedy pass@1: one completion per problem, run against its tests in the sandbox."""
    from dsv3.eval.multiple_choice import stderr

    if not items:
        raise ValueError("no items to evaluate")
    completions = generate([it.prompt for it in items], max_new_tokens, items[0].stop)
    programs = [humaneval_program(it, c) for it, c in zip(items, completions)]
    results = run_programs(programs, timeout, memory_mb, workers, progress=progress, desc="humaneval")
    passed = [float(r.passed) for r in results]
    records = [{"id": it.id, "completion": c, "status": r.status, "seconds": round(r.seconds, 3)}
               for it, c, r in zip(items, completions, results)]
    metrics = {"pass@1": sum(passed) / len(passed), "pass@1_stderr": stderr(passed), "n": len(items)}
    return metrics, records
