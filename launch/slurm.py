"""Train on a SLURM cluster through submitit: one task (rank) per GPU, or ``--tasks-per-node`` on CPUs.

    python launch/slurm.py --nodes 8 --gpus-per-node 8 --partition P --time 72:00:00 --config run.yaml
    python launch/slurm.py --nodes 2 --tasks-per-node 4 --cpus-per-task 8 --partition cpu --time 2:00:00 \\
        --config configs/tiny_cpu.yaml --run-dir runs/exp1 train.max_steps=5000
    python launch/slurm.py ... --dry-run            # print the sbatch script, submit nothing
    python launch/slurm.py ... --wait               # block until the job ends; exit with its status
    python launch/slurm.py --local --tasks-per-node 2 ...   # the same job through submitit's LocalExecutor

Inside the job every task sets RANK (global rank), WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (the first
host of the allocation), MASTER_PORT (20000 + job id % 20000), GOEMBED_LAUNCHER=slurm and
OMP_NUM_THREADS (= --cpus-per-task), then runs ``trainer.trainer.Trainer(config).fit()`` in-process.

Preemption and time limits: SLURM sends SIGUSR2 ``--signal-delay-s`` before the end (and on
``scancel --signal USR2``); submitit then calls :meth:`TrainJob.checkpoint`, which returns the job
itself, and requeues it (``scontrol requeue``). The requeued job resumes from the run's periodic
checkpoint (``checkpoints/latest``), so the step count continues. At most ``--max-requeues``
requeues (default 3) are made; after that the job ends with an error.

On submit the job id, the log files and a ``tail -f`` command to follow them are printed; submitit
keeps its files (the pickled job, the sbatch script, the logs) in ``--folder`` (default:
RUN_DIR/slurm/%j).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import multiprocessing.util
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


def master_port(job_id: str) -> int:
    """A port derived from the job id (the same on every node and after a requeue)."""
    digits = re.match(r"\d+", str(job_id))
    return 20000 + (int(digits.group()) if digits else 0) % 20000


@dataclasses.dataclass
class TrainJob:
    """What submitit pickles and runs once per task: the Trainer on the config of ``argv``, with the
    distributed environment of the task. Checkpointable: on preemption or time-out it requeues
    itself (the trainer resumes from ``latest``), at most ``max_requeues`` times."""

    argv: list
    cpus_per_task: int = 1
    max_requeues: int = 3
    requeues: int = 0
    cwd: str = ROOT
    local: bool = False

    def __call__(self) -> str:
        import submitit

        env = submitit.JobEnvironment()
        hosts = list(env.hostnames)
        # A requeued task may have left an error result (its loader worker was killed by the requeue),
        # or half of one: submitit writes RESULT.save_tmp and renames it, and a SIGTERM during the
        # requeue can land in between; submitit then refuses to save this run's result (seen in CI).
        # Remove both so that only this run's outcome is read by `--wait`.
        result = env.paths.result_pickle
        for stale in (result, result.with_suffix(result.suffix + ".save_tmp")):
            if stale.exists():
                stale.unlink()
        os.environ.update({
            "RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks), "LOCAL_RANK": str(env.local_rank),
            "MASTER_ADDR": "127.0.0.1" if self.local or not hosts else hosts[0],
            "MASTER_PORT": str(master_port(env.job_id)), "GOEMBED_LAUNCHER": "slurm",
            "OMP_NUM_THREADS": str(self.cpus_per_task),
        })
        import torch

        torch.set_num_threads(self.cpus_per_task)
        # Only the task's own process answers a preemption. A data-loader worker (a forked
        # multiprocessing child) inherits submitit's USR2 handler and would checkpoint and requeue
        # too; and SLURM's SIGTERM, which comes before the USR2, would kill it, so that torch raises
        # "DataLoader worker is killed by signal" in the task before the requeue can run (seen in
        # CI). Workers ignore the USR2, block the SIGTERM and end with the task. multiprocessing's hook, not
        # os.register_at_fork: it runs only in multiprocessing children, so programs the task starts
        # with subprocess do not inherit ignored signals across exec.
        multiprocessing.util.register_after_fork(_PREEMPTION_HOOK, _ignore_preemption_signals)
        os.chdir(self.cwd)
        if env.global_rank == 0:
            print(f"slurm: job {env.job_id}, {env.num_tasks} tasks on {hosts}, master {os.environ['MASTER_ADDR']}:"
                  f"{os.environ['MASTER_PORT']}, requeue {self.requeues}/{self.max_requeues}", file=sys.stderr, flush=True)
        import logging

        from trainer.config import load_config
        from trainer.trainer import Trainer

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        config_file, overrides = split_config_argv(self.argv)
        try:
            return os.path.abspath(Trainer(load_config(config_file, overrides)).fit())
        finally:
            # The loader workers block SIGTERM (below), and multiprocessing's exit handler ends the
            # workers still alive (persistent ones are, after the last epoch) with SIGTERM and then
            # waits for them: end them here instead, first taking back SIGCHLD from torch's loader
            # handler, which would raise "DataLoader worker is killed" for the workers killed here.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for child in multiprocessing.active_children():
                child.kill()
                child.join(timeout=10)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit (rank 0) on preemption or time-out: requeue unless the bound is reached.
        Nothing is saved here: the trainer resumes from its last periodic checkpoint."""
        import submitit

        if self.requeues >= self.max_requeues:
            print(f"slurm: not requeuing: {self.requeues} requeues already (--max-requeues {self.max_requeues})",
                  file=sys.stderr, flush=True)
            return None
        # While submitit requeues (scontrol requeue), SLURM already sends SIGTERM to the step: a loader
        # worker dies, and torch's SIGCHLD handler would raise inside the requeue, turning it into a
        # failed job. The run is over in this process anyway.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        print(f"slurm: preempted or timed out; requeuing ({self.requeues + 1}/{self.max_requeues}), "
              "the run resumes from checkpoints/latest", file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self, requeues=self.requeues + 1))


class _PreemptionHook:
    """multiprocessing keeps its after-fork callbacks in a weak registry: this object keeps ours."""


_PREEMPTION_HOOK = _PreemptionHook()


def _ignore_preemption_signals(_hook: _PreemptionHook | None = None) -> None:
    # SIGTERM is blocked, not ignored: a torch loader worker installs its own SIGTERM handler after
    # this hook has run (torch/csrc/DataLoader.cpp), while the signal mask it inherits stays.
    try:
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    except (ValueError, OSError):
        pass


def split_config_argv(argv: list) -> tuple:
    argv = list(argv)
    if argv[:1] == ["--config"]:
        return argv[1], argv[2:]
    return None, argv


def parse_time(text: str) -> int:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) to whole minutes (at least 1)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a SLURM time: {text!r} (e.g. 30, 4:00:00, 2-00:00:00)")
    days, a, b, c = match.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # H:M:S
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # M:S
        seconds = int(a) * 60 + int(b)
    else:  # M
        seconds = int(a) * 60
    return max(1, -(-seconds // 60))


def parse_mem_mb(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 16G, 512M)")
    value, unit = float(match.group(1)), match.group(2) or "G"
    return max(1, int(value * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]))


def build_parser() -> argparse.ArgumentParser:
    from trainer.config import config_help

    p = argparse.ArgumentParser(prog="python launch/slurm.py", description=__doc__, epilog=config_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML run config (default: built-in defaults)")
    p.add_argument("--run-dir", default=None, help="run directory (shorthand for run_dir=DIR)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task (rank) per GPU")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks (ranks) per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task; also OMP_NUM_THREADS (default: 1)")
    p.add_argument("--mem-per-task", type=parse_mem_mb, default=None, metavar="SIZE",
                   help="memory per task, e.g. 32G (requested as --mem = SIZE x tasks per node)")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", type=parse_time, default=parse_time("1:00:00"), metavar="TIME",
                   help="time limit in SLURM's format: minutes, H:M:S or D-H:M:S (default: 1:00:00)")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--exclusive", action="store_true", help="whole nodes (sbatch --exclusive)")
    p.add_argument("--job-name", default="goembed")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="any other #SBATCH option, e.g. --sbatch reservation=R (repeatable)")
    p.add_argument("--folder", default=None, help="submitit's folder for scripts and logs (default: RUN_DIR/slurm/%%j)")
    p.add_argument("--max-requeues", type=int, default=3, help="requeues after preemption/time-out (default: %(default)s)")
    p.add_argument("--signal-delay-s", type=int, default=120,
                   help="SIGUSR2 this long before the time limit, to requeue (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit without submitting")
    p.add_argument("--wait", action="store_true", help="block until the job ends and exit with its status")
    p.add_argument("--local", action="store_true", help="run through submitit's LocalExecutor on this machine")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    return p


def slurm_parameters(args, run_dir: str) -> dict:
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    cpus = args.cpus_per_task or 1
    params = {"job_name": args.job_name, "nodes": args.nodes, "ntasks_per_node": tasks, "cpus_per_task": cpus,
              "time": args.time, "signal_delay_s": args.signal_delay_s, "srun_args": ["--kill-on-bad-exit=1"],
              # the job runs `python -u -m submitit.core._submit`: make this repository importable there
              "setup": [f"export PYTHONPATH={shlex.quote(ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}",
                        f"export OMP_NUM_THREADS={cpus}"]}
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_per_task:
        params["mem"] = f"{args.mem_per_task * tasks}M"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    if args.exclusive:
        params["exclusive"] = True
    extra = {}
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--sbatch wants KEY=VALUE, got {item!r}")
        extra[key.strip().lstrip("-").replace("-", "_")] = value
    if extra:
        params["additional_parameters"] = extra
    return params


def folder_of(args, run_dir: str) -> str:
    return os.path.abspath(args.folder or os.path.join(run_dir, "slurm", "%j"))


def dry_run_script(args, run_dir: str) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    folder = folder_of(args, run_dir)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(folder)])
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(args, run_dir))


def make_executor(args, run_dir: str):
    import submitit

    folder = folder_of(args, run_dir)
    if args.local:
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=args.max_requeues)
        executor.update_parameters(timeout_min=args.time, tasks_per_node=(args.tasks_per_node or args.gpus_per_node or 1)
                                   * args.nodes, gpus_per_node=args.gpus_per_node, signal_delay_s=args.signal_delay_s)
    else:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.max_requeues)
        executor.update_parameters(**slurm_parameters(args, run_dir))
    return executor


def job_state(job_id: str) -> str | None:
    """The job's state from slurmctld (no accounting needed); None once it is forgotten."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "UNKNOWN"
    match = re.search(r"JobState=(\S+)", out.stdout)
    if out.returncode != 0 or not match:
        return None
    return match.group(1)


def task_outcomes(job) -> list:
    """(outcome, value) per task whose result pickle exists, else None."""
    results = []
    for task in range(job.num_tasks):
        path = job.paths.result_pickle if job.num_tasks == 1 else job.task(task).paths.result_pickle
        if path.exists():
            with open(path, "rb") as f:
                results.append(pickle.load(f))
        else:
            results.append(None)
    return results


def wait_for(job, local: bool, poll: float = 2.0, grace: float = 30.0) -> int:
    """Block until every task wrote its result (or SLURM says the job ended without one); exit status."""
    ended_since = None
    while True:
        outcomes = task_outcomes(job)
        if all(o is not None for o in outcomes):
            break
        if local:
            if job.done():
                outcomes = task_outcomes(job)
                break
        else:
            state = job_state(job.job_id)
            ended = state is None or state.rstrip("+") in TERMINAL_STATES
            ended_since = (ended_since or time.time()) if ended else None
            if ended and (outcomes[0] is not None or time.time() - ended_since > grace):
                print(f"job {job.job_id} ended: {state or 'gone from slurmctld'}", file=sys.stderr)
                break
        time.sleep(poll)
    failed = [(task, o) for task, o in enumerate(outcomes) if o is None or o[0] != "success"]
    if not failed:
        return 0
    task, outcome = failed[0]
    detail = "no result (killed?)" if outcome is None else str(outcome[1])[-3000:]
    print(f"job {job.job_id} failed: task {task}: {detail}", file=sys.stderr)
    print(f"logs: {job.paths.stderr}", file=sys.stderr)
    return 1


def main(argv: list | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nodes < 1 or (args.tasks_per_node is not None and args.tasks_per_node < 1) or args.max_requeues < 0:
        parser.error("--nodes and --tasks-per-node must be >= 1, --max-requeues >= 0")
    if args.local and args.nodes != 1:
        parser.error("--local runs on this machine: use --nodes 1 and --tasks-per-node N")
    from launch.paths import describe, load_resolved

    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
    # Fails here, once, on a bad config; relative paths: against this directory, on every node.
    config_file, overrides, config = load_resolved(args.config, overrides)
    run_dir = config.run_dir
    trainer_argv = (["--config", config_file] if config_file else []) + overrides
    print(describe(config), file=sys.stderr)
    if args.dry_run:
        print(dry_run_script(args, run_dir))
        print(f"# trainer arguments: {shlex.join(trainer_argv)}")
        return 0

    from launch.local import ensure_embedded_data

    ensure_embedded_data(config.data.train_urls)
    job_fn = TrainJob(trainer_argv, cpus_per_task=args.cpus_per_task or 1, max_requeues=args.max_requeues,
                      cwd=os.getcwd(), local=args.local)
    executor = make_executor(args, run_dir)
    job = executor.submit(job_fn)
    stdout, stderr = str(job.paths.stdout), str(job.paths.stderr)
    print(f"submitted job {job.job_id} ({'local' if args.local else 'slurm'}, "
          f"{job.num_tasks} tasks); run_dir {run_dir}")
    print(f"logs (rank 0): {stdout}\n               {stderr}")
    print(f"follow: tail -f {shlex.quote(stdout)} {shlex.quote(stderr)}", flush=True)
    if not args.wait:
        return 0
    code = wait_for(job, args.local)
    if code == 0:
        print(f"run_dir: {run_dir}")
    return code


if __name__ == "__main__":
    # Run as the importable module launch.slurm, so the pickled TrainJob refers to launch.slurm and
    # not to __main__ (which does not exist inside the job).
    from launch.slurm import main as _main

    sys.exit(_main())
