"""Training checkpoints: `torch.distributed.checkpoint` (DCP) for the resumable state, an HF folder for people.

One checkpoint, `checkpoints/step_NNNNNNN/`:

    state/            DCP: model and AdamW state keyed by plain parameter names (optimizer flattened per
                      parameter), each rank writing what it holds: FSDP2 shards (DTensors), its owned experts
                      under expert parallel, or whole tensors. DCP reshards on load, so any world size and
                      parallel mode (one process, DDP, FSDP2, expert parallel) resumes from any other.
    train_state.pt    step, recipe, world size, scheduler, loader, balancer and every rank's RNG states
    model/            the float32 masters in HF layout with the data's tokenizer files: `dsv3 generate`,
                      `dsv3 eval` and `dsv3.load_model` read it as they read any checkpoint
    manifest.json     every file's size, written last: a folder without it never completed

Checkpoints are written into `.step_NNNNNNN.tmp/` and renamed, then `latest` is pointed at them, so a killed
run leaves only complete ones. On resume the newest checkpoint whose files all match the manifest and load
is taken; a damaged one is named in a warning and the next older one tried (`find_resumable`).
With `async_save` the DCP part is written by a background thread (`dcp.async_save`) while training goes on;
the checkpoint is finished (manifest, rename, `latest`) before the next save or at the end of the run.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.pt"
_OPTIONS = {"flatten_optimizer_state_dict": True}  # one entry per parameter: any split of the parameters loads it


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be read; the message names it."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


# DCP warns on every call made without a process group ("assuming the intent is to save in a single process"),
# which is what one process means here; async saves warn from their own thread, so the filter is module-wide
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(**_OPTIONS))
    return {"model": model_state, "optimizer": optim_state}


def _manifest(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def verify(folder: Path) -> str | None:
    """None when every file of the manifest is there with its size, else what is wrong, naming the file."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        if (folder / TRAIN_STATE).is_file() and not (folder / "state").is_dir():
            return f"{folder} was written by an older dsv3 (no DCP state/); start a new run from its model/ weights"
        return f"{manifest_path} is missing (the checkpoint never completed)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, OSError) as err:
        return f"{manifest_path}: unreadable ({err})"
    for name, size in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
    return None


def read_train_state(folder: Path) -> dict:
    """`train_state.pt` of a checkpoint; a damaged file is a `DamagedCheckpoint` naming it in one line."""
    path = folder / TRAIN_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises RuntimeError, pickle errors, EOFError, zipfile errors...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DamagedCheckpoint(f"{path}: unreadable ({first})") from None


def candidates(ckpt_dir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest first (`latest`'s target leads when it names one)."""
    folders = sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), reverse=True)
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        named = ckpt_dir / pointer.read_text().strip()
        if named in folders:
            folders.remove(named)
            folders.insert(0, named)
    return folders


def load(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read `folder/state` into the (possibly sharded) model and optimizer. Collective under a process group;
    a damaged file raises `DamagedCheckpoint` naming the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    state = _state_dicts(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(folder / "state"))
    except Exception as err:  # DCP wraps each rank's failure in a CheckpointException
        text = " ".join(str(err).split())
        raise DamagedCheckpoint(f"{folder / 'state'}: unreadable ({text[:200]})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(**_OPTIONS))


def find_resumable(ckpt_dir: Path, try_load: Callable[[Path], Any],
                   warn: Callable[[str], None]) -> tuple[Path, Any]:
    """The newest checkpoint that is complete and that `try_load(folder)` reads without `DamagedCheckpoint`,
    and what it returned (other errors, such as changed settings, propagate). Each one passed over is named in
    a `warn` line; when none is left, a ValueError says why the newest failed."""
    tried: list[str] = []
    for folder in candidates(ckpt_dir):
        problem = verify(folder)
        if problem is None:
            try:
                return folder, try_load(folder)
            except DamagedCheckpoint as err:
                problem = str(err)
        tried.append(problem)
        warn(f"warning: checkpoint {folder.name} is damaged: {problem}; trying an older one")
    if not tried:
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}")
    raise ValueError(f"--resume: no intact checkpoint in {ckpt_dir} (newest: {tried[0]})")


class CheckpointWriter:
    """Writes checkpoints of one run (see the module docstring); every rank holds one and calls `save`."""

    def __init__(self, ckpt_dir: Path, rank: int, distributed: bool, keep: int, async_save: bool = False) -> None:
        self.dir, self.rank, self.distributed, self.keep = Path(ckpt_dir), rank, distributed, keep
        self.async_save = async_save
        self._pending: tuple[Any, Path, Path] | None = None  # (future, tmp folder, final folder)
        # async DCP runs its collectives from a background thread: on a group of its own (gloo, which also
        # serves CUDA tensors staged to the CPU), never interleaved with the training step's
        self._group = dist.new_group(backend="gloo") if async_save and distributed else None

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, train_state: dict | None,
             write_model_folder: Callable[[Path], None]) -> Path:
        """Write checkpoint `step`. `train_state` is rank 0's (None elsewhere); `write_model_folder(path)` writes
        the HF folder (rank 0; it may gather from the other ranks, so every rank calls it)."""
        import torch.distributed.checkpoint as dcp
        self.finish()
        name = checkpoint_name(step)
        tmp, final = self.dir / f".{name}.tmp", self.dir / name
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        state = _state_dicts(model, optimizer)
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp / "state"), process_group=self._group)
        else:
            dcp.save(state, checkpoint_id=str(tmp / "state"))
            future = None
        write_model_folder(tmp / "model")
        if self.rank == 0:
            torch.save(train_state, tmp / TRAIN_STATE)
        self._pending = (future, tmp, final)
        if not self.async_save:
            self.finish()
        return final

    def finish(self) -> None:
        """Complete the checkpoint in flight: wait for its DCP write, then manifest, rename, `latest`, pruning."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        if future is not None:
            future.result()
        self._barrier()  # every rank's files are written
        if self.rank == 0:
            (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=0) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = self.dir / ".latest.tmp"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, self.dir / "latest")
            kept = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
            for old in kept[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
