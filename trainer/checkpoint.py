"""Checkpoints: DeepSpeed shards + per-rank trainer state, a manifest, and a ``latest`` pointer.

Layout of ``<dir>/step_00000100/``:

    <DeepSpeed files>              engine.save_checkpoint (model, optimizer, scheduler; sharded)
    trainer_rank00000.pt ...       per rank: step, reader state, RNG states, EMA (weights only)
    model.safetensors              portable weights (EMA, whole, fp32) + model_trained.safetensors
    model_config.json              and the model config: see trainer/portable.py
    config.yaml                    the run config, credentials removed
    MANIFEST.json                  every file and its size, written after every rank finished

``<dir>/latest`` names the newest complete tag and is written last, by rank 0, after a barrier
and after the manifest: a crash at any point of a save leaves ``latest`` on the previous
complete checkpoint. Rank 0 alone reads ``latest`` and broadcasts it (on a shared filesystem
ranks reading it themselves could disagree). Loading checks the manifest (a missing or
truncated rank shard is refused with a message naming it); a checkpoint written by a different
number of ranks is loaded through DeepSpeed's universal checkpoint (trainer/elastic.py).
``dir`` may be any fsspec URL (s3://...): files are written to a local staging directory and
uploaded by each node's local rank 0.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline import storage
from data_pipeline.atomic_files import write_atomic
from model_zoo.checkpoint_layout import LATEST, MANIFEST, RUN_CONFIG, TAG_PREFIX, rank_file, tag_for
from trainer.distributed import DistEnv, barrier, broadcast_object


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file or rank."""


@dataclass
class TrainerState:
    """What one rank needs, beyond DeepSpeed's shards, to continue exactly."""

    step: int
    reader: dict
    rng: dict
    ema: dict[str, torch.Tensor] | None
    nonfinite_steps: int = 0


def capture_rng(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state(),
             "numpy": json.dumps(_jsonable(np.random.get_state())), "python": json.dumps(_jsonable(random.getstate()))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    numpy_state = json.loads(state["numpy"])
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    python_state = json.loads(state["python"])
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    return value


class Checkpointer:
    def __init__(self, url: str, env: DistEnv, keep_last: int = 3, storage_options: dict | None = None,
                 staging_root: str | None = None):
        self.url, self.env, self.keep_last = url.rstrip("/"), env, keep_last
        self.storage_options = storage_options
        self.local = storage.is_local(url)
        self.staging_root = staging_root or tempfile.gettempdir()

    # -- paths -----------------------------------------------------------------------------------
    def local_dir(self, tag: str) -> str:
        """Where this node writes (and reads) the files of ``tag``: the checkpoint itself, or its staging copy."""
        if self.local:
            return os.path.join(storage.local_path(self.url), tag)
        return os.path.join(self.staging_root, "goembed-ckpt-staging", storage.basename(self.url) or "ckpt", tag)

    def latest_tag(self) -> str | None:
        """The tag ``latest`` names, as rank 0 reads it (every rank must call this: it broadcasts)."""
        return broadcast_object(self.read_latest() if self.env.is_main else None)

    def read_latest(self) -> str | None:
        """This process's own reading of ``latest`` (no collective; tools and tests)."""
        url = storage.join(self.url, LATEST)
        if not storage.exists(url, self.storage_options):
            return None
        with storage.open_url(url, "rb", self.storage_options) as f:
            return f.read().decode().strip() or None

    # -- save --------------------------------------------------------------------------------------
    def save(self, engine, state: TrainerState, config_yaml: str, model=None, ema=None) -> str:
        """Every rank: DeepSpeed's shards, its own trainer state; rank 0: config, portable weights
        (``model`` given: gathered from every rank), manifest, ``latest``."""
        tag = tag_for(state.step)
        local_dir = self.local_dir(tag)
        parent = os.path.dirname(local_dir)
        if self.env.is_main and os.path.isdir(local_dir):  # leftovers of a crashed save of this step
            shutil.rmtree(local_dir)
        barrier()
        try:
            os.makedirs(local_dir, exist_ok=True)
            engine.save_checkpoint(parent, tag=tag, save_latest=False)
            torch.save(state.__dict__, os.path.join(local_dir, rank_file(self.env.rank)))
            if model is not None:
                from trainer.portable import gather_weights, write_portable

                # collective under ZeRO-3; only rank 0 keeps the whole copy
                trained, averaged = gather_weights(engine, ema, self.env.device, keep=self.env.is_main)
                if self.env.is_main:
                    write_portable(local_dir, model.config, trained, averaged, state.step)
            if self.env.is_main:
                with open(os.path.join(local_dir, RUN_CONFIG), "w") as f:
                    f.write(config_yaml)
        except Exception as error:
            raise self._disk_full(local_dir, error) or error
        barrier()  # every rank's files are on (node-local) disk
        if self.env.is_main:
            self._write_manifest(local_dir, state.step)
        barrier()
        if not self.local and self.env.local_rank == 0:
            self._upload(local_dir, tag)
        barrier()  # every node uploaded
        if self.env.is_main:
            self._write_latest(tag)
            self._prune(tag)
        self._prune_staging(tag)
        barrier()
        return tag

    def _disk_full(self, local_dir: str, error: BaseException) -> OSError | None:
        """An ``ENOSPC`` OSError that says so, if ``error`` came from a full disk (torch.save reports one as
        "unexpected pos ..."), else None. ``latest`` still names the previous checkpoint."""
        chain, seen = error, False
        while chain is not None and not seen:
            seen = isinstance(chain, OSError) and chain.errno == errno.ENOSPC
            chain = chain.__cause__ or chain.__context__
        try:
            stat = os.statvfs(local_dir)
            free = stat.f_bavail * stat.f_frsize
        except OSError:
            free = None
        if not seen and (free is None or free > 16 << 20):
            return None
        previous = self.latest_tag()
        kept = f"the previous checkpoint {previous} is intact and stays '{LATEST}'" if previous else "no earlier checkpoint"
        free_text = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
        return OSError(errno.ENOSPC, f"No space left on device while writing checkpoint {local_dir} ({free_text}); "
                       f"{kept}", local_dir)

    def _prune_staging(self, newest: str) -> None:
        """Local staging copies of an object-store checkpoint: keep the newest ``keep_last`` (at least the newest)."""
        if self.local or self.env.local_rank != 0:
            return
        root = os.path.dirname(self.local_dir(newest))
        staged = sorted(t for t in os.listdir(root) if t.startswith(TAG_PREFIX) and t <= newest)
        for tag in staged[:-max(self.keep_last, 1)]:
            shutil.rmtree(os.path.join(root, tag), ignore_errors=True)

    def _write_manifest(self, local_dir: str, step: int) -> None:
        files = {}
        for root, _, names in os.walk(local_dir):
            for name in names:
                path = os.path.join(root, name)
                files[os.path.relpath(path, local_dir)] = os.path.getsize(path)
        manifest = {"step": step, "world_size": self.env.world_size, "files": files}
        write_atomic(os.path.join(local_dir, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))

    def _upload(self, local_dir: str, tag: str) -> None:
        fs, base = storage.filesystem(self.url, self.storage_options)
        for root, _, names in os.walk(local_dir):
            for name in sorted(names, key=lambda n: n == MANIFEST):  # the manifest goes up last
                path = os.path.join(root, name)
                fs.put(path, base + "/" + tag + "/" + os.path.relpath(path, local_dir).replace(os.sep, "/"))

    def _write_latest(self, tag: str) -> None:
        url = storage.join(self.url, LATEST)
        if self.local:  # atomic rename: a reader never sees a half-written pointer
            write_atomic(storage.local_path(url), tag + "\n")
        else:  # an object store's PUT is atomic
            with storage.open_url(url, "wb", self.storage_options) as f:
                f.write((tag + "\n").encode())

    def _prune(self, newest: str) -> None:
        fs, base = storage.filesystem(self.url, self.storage_options)
        fs.invalidate_cache()  # object-store listings are cached per process; this one must be fresh
        tags = sorted(name.rsplit("/", 1)[-1] for name in fs.ls(base, detail=False) if name.rsplit("/", 1)[-1].startswith(TAG_PREFIX))
        complete = [t for t in tags if t <= newest]
        for tag in complete[:-self.keep_last] if self.keep_last else []:  # keep_last=0: someone else prunes
            fs.rm(base + "/" + tag, recursive=True)
        # Incomplete saves newer than `latest` (a crash mid-save) are removed too: never resumed from.
        for tag in tags:
            if tag > newest:
                fs.rm(base + "/" + tag, recursive=True)

    # -- load --------------------------------------------------------------------------------------
    def verify(self, tag: str) -> dict:
        """The manifest of ``tag`` after checking every listed file exists with its size."""
        fs, base = storage.filesystem(self.url, self.storage_options)
        manifest_url = f"{base}/{tag}/{MANIFEST}"
        if not fs.exists(manifest_url):
            raise CheckpointError(f"checkpoint {self.url}/{tag} has no {MANIFEST}: it was never completed")
        with fs.open(manifest_url, "rb") as f:
            manifest = json.loads(f.read().decode())
        for name, size in manifest["files"].items():
            path = f"{base}/{tag}/{name}"
            if not fs.exists(path):
                raise CheckpointError(f"checkpoint {self.url}/{tag} is missing {name} (a rank's shard); refusing to resume from it")
            if fs.size(path) != size:
                raise CheckpointError(f"checkpoint {self.url}/{tag}: {name} has {fs.size(path)} bytes, the manifest says {size}")
        for rank in range(manifest["world_size"]):
            if rank_file(rank) not in manifest["files"]:
                raise CheckpointError(f"checkpoint {self.url}/{tag} has no trainer state for rank {rank}")
        return manifest

    def portable_ema(self, tag: str) -> dict[str, torch.Tensor]:
        """The whole EMA weights of a loaded checkpoint (its portable model.safetensors)."""
        from trainer.portable import read_weights

        return read_weights(self.local_dir(tag))

    def load(self, engine, tag: str | None = None) -> tuple[list[TrainerState], str]:
        """Load DeepSpeed state into ``engine``; returns (every saved rank's TrainerState, tag).

        Written by a different number of ranks: converted to DeepSpeed's universal format (once
        per node) and loaded from there, so the optimizer state is re-partitioned."""
        tag = tag or self.latest_tag()
        if tag is None:
            raise CheckpointError(f"no checkpoint in {self.url} (no '{LATEST}' file)")
        manifest = self.verify(tag)
        local_dir = self.local_dir(tag)
        if not self.local and self.env.local_rank == 0:
            fs, base = storage.filesystem(self.url, self.storage_options)
            os.makedirs(local_dir, exist_ok=True)
            for name in manifest["files"]:
                target = os.path.join(local_dir, name)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                fs.get(f"{base}/{tag}/{name}", target)
        barrier()
        sharded = any(name.startswith("zero_pp_rank_") for name in manifest["files"])
        if manifest["world_size"] == self.env.world_size or not sharded:  # ZeRO-0: whole states, any ranks
            load_path, _ = engine.load_checkpoint(os.path.dirname(local_dir), tag=tag, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        else:
            from trainer.elastic import load_universal

            load_path = load_universal(engine, local_dir, os.path.join(self.staging_root, "goembed-universal"), self.env)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {self.url}/{tag}")
        states = [TrainerState(**torch.load(os.path.join(local_dir, rank_file(rank)), map_location="cpu", weights_only=True))
                  for rank in range(manifest["world_size"])]
        return states, tag
