"""Checkpoints on the Hugging Face Hub: pushed in the background as they are written, resumed from the Hub.

Layout: a folder per checkpoint in the model repo's main branch, ``checkpoints/checkpoint-<step>/``, uploaded as
**one commit** (the Hub applies a commit atomically) whose last file is ``checkpoint_complete.json``, the list of
the checkpoint's files and sizes. A folder per checkpoint (not a branch per checkpoint) browses on the Hub next to
the pipeline it will become, downloads with one ``allow_patterns``, and rotates with one deletion commit.

A resume takes the newest checkpoint whose marker is present and lists exactly the files the folder holds, so a
half-uploaded one (an upload cut by something other than this module, or a stand-in that is not atomic) is never
taken. Uploads run on one background thread, in order, from a hard-linked snapshot of the checkpoint (the local
rotation may delete the folder meanwhile); a failure (server error, timeout, dropped connection, rate limit) is
retried with exponential backoff and logged in one line, and never reaches the training loop.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .errors import UsageError, describe_exception

logger = logging.getLogger(__name__)

HUB_FOLDER = "checkpoints"
MARKER = "checkpoint_complete.json"
_NAME = re.compile(rf"^{HUB_FOLDER}/checkpoint-(\d+)/{re.escape(MARKER)}$")
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
RETRIES, RETRY_BACKOFF = 5, 2.0  # attempts after the first, and the first wait (s), doubled each time


def scrub(text: str, token: Optional[str]) -> str:
    """``text`` with the token (if any) blanked: no message of this module carries it."""
    return text.replace(token, "***") if token else text


def is_hub_repo_id(value: Optional[str]) -> bool:
    """True for ``owner/name`` that is neither an existing local path nor a ``…/checkpoint-<step>`` folder name
    (``--resume_from_checkpoint``)."""
    return (bool(value) and REPO_ID.match(value) is not None and not os.path.exists(value)
            and re.match(r"^checkpoint-\d+$", value.split("/")[-1]) is None)


def snapshot(checkpoint: Path, staging: Path) -> Path:
    """A hard-linked copy of ``checkpoint`` under ``staging`` (a copy where links are refused): the upload reads
    it while the local rotation is free to delete the original."""
    target = staging / checkpoint.name
    shutil.rmtree(target, ignore_errors=True)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(checkpoint, target, copy_function=link)
    files = {str(p.relative_to(target)): p.stat().st_size for p in sorted(target.rglob("*")) if p.is_file()}
    (target / MARKER).write_text(json.dumps({"step": int(checkpoint.name.split("-")[1]), "files": files}, indent=1))
    return target


class CheckpointUploader:
    """Uploads each checkpoint handed to :meth:`submit` into ``repo_id`` (``checkpoints/checkpoint-<step>/``), one at
    a time on a background thread, keeping at most ``total_limit`` complete checkpoints on the Hub.

    ``retries`` attempts after the first, waiting ``backoff · 2^attempt`` seconds between them. :meth:`close` waits
    (at most ``timeout`` seconds, with a progress bar) for what is pending and returns the steps that did not make it.
    ``api`` is a :class:`huggingface_hub.HfApi` (a test may pass its own).
    """

    def __init__(self, repo_id: str, token: Optional[str], staging_dir: str, total_limit: Optional[int] = None,
                 retries: Optional[int] = None, backoff: Optional[float] = None, api=None, private: bool = False):
        from huggingface_hub import HfApi

        self.api = api or HfApi(token=token)
        self.token, self.total_limit = token, total_limit
        self.retries = RETRIES if retries is None else retries
        self.backoff = RETRY_BACKOFF if backoff is None else backoff
        try:
            self.repo_id = self.api.create_repo(repo_id, exist_ok=True, private=private).repo_id
        except Exception as e:
            raise UsageError(f"--push_checkpoints: cannot create or reach the repo {repo_id} "
                             f"({scrub(describe_exception(e), token)})") from None
        self.staging = Path(staging_dir)
        self.pending: deque = deque()
        self.failed: List[int] = []
        self.uploaded: List[int] = []
        self.condition = threading.Condition()
        self.closing = False
        self.abandoned = threading.Event()  # set when close() stops waiting: no more attempts
        self.thread = threading.Thread(target=self._run, name="checkpoint-uploader", daemon=True)
        self.thread.start()

    def submit(self, checkpoint: Path) -> None:
        """Queues ``checkpoint`` (a complete local folder) for upload; returns at once."""
        staged = snapshot(Path(checkpoint), self.staging)
        with self.condition:
            self.pending.append(staged)
            self.condition.notify()

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.pending and not self.closing:
                    self.condition.wait()
                if not self.pending:
                    return
                staged = self.pending[0]
            step = int(staged.name.split("-")[1])
            if self._upload(staged, step):
                self.uploaded.append(step)
                self._rotate()
            else:
                self.failed.append(step)
            shutil.rmtree(staged, ignore_errors=True)
            with self.condition:
                self.pending.popleft()
                self.condition.notify_all()

    def _attempts(self, what: str, call: Callable[[], object]) -> bool:
        for attempt in range(self.retries + 1):
            if self.abandoned.is_set():
                return False
            try:
                call()
                return True
            except Exception as e:  # the network's faults are many; none may reach the training loop
                message = scrub(describe_exception(e), self.token)
                if attempt == self.retries:
                    logger.warning(f"{what} to {self.repo_id} failed after {attempt + 1} attempts ({message}); giving up")
                    return False
                delay = self.backoff * 2 ** attempt
                logger.warning(f"{what} to {self.repo_id} failed ({message}); retry {attempt + 1}/{self.retries} in {delay:g} s")
                self.abandoned.wait(delay)
        return False

    def _upload(self, staged: Path, step: int) -> bool:
        from huggingface_hub import CommitOperationAdd

        # The marker goes last in the one commit: a reader that sees it sees a complete checkpoint.
        files = sorted((p for p in staged.rglob("*") if p.is_file() and p.name != MARKER), key=str) + [staged / MARKER]
        operations = [CommitOperationAdd(f"{HUB_FOLDER}/{staged.name}/{p.relative_to(staged).as_posix()}", str(p)) for p in files]
        ok = self._attempts(f"upload of checkpoint-{step}", lambda: self.api.create_commit(
            self.repo_id, operations, commit_message=f"checkpoint-{step}"))
        if ok:
            logger.info(f"Pushed checkpoint-{step} to {self.repo_id}/{HUB_FOLDER}")
        return ok

    def _rotate(self) -> None:
        if self.total_limit is None:
            return
        from huggingface_hub import CommitOperationDelete

        try:
            steps = hub_checkpoint_steps(self.api, self.repo_id, complete_only=False)
        except Exception as e:
            logger.warning(f"rotation of {self.repo_id}/{HUB_FOLDER} skipped ({scrub(describe_exception(e), self.token)})")
            return
        stale = steps[:-self.total_limit]
        if stale:
            operations = [CommitOperationDelete(f"{HUB_FOLDER}/checkpoint-{s}/", is_folder=True) for s in stale]
            self._attempts(f"removal of checkpoint-{', '.join(map(str, stale))}", lambda: self.api.create_commit(
                self.repo_id, operations, commit_message=f"remove checkpoint-{', '.join(map(str, stale))}"))

    def close(self, timeout: float = 600.0) -> List[int]:
        """Waits at most ``timeout`` seconds for the pending uploads (a progress bar counts them down) and returns
        the steps whose checkpoints are not on the Hub: failed, or still pending at the timeout."""
        from tqdm.auto import tqdm

        deadline = time.monotonic() + timeout
        with self.condition:
            total = len(self.pending)
            self.closing = True
            self.condition.notify_all()
        with tqdm(total=total, desc="Pushing checkpoints", disable=total == 0) as bar:
            with self.condition:
                while self.pending and time.monotonic() < deadline:
                    self.condition.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                    bar.n = total - len(self.pending)
                    bar.refresh()
                left = [int(p.name.split("-")[1]) for p in self.pending]
        self.abandoned.set()  # an upload still retrying stops at its next attempt; one in flight finishes or fails
        missing = sorted(self.failed + left)
        if missing:
            logger.warning(f"checkpoint-{', checkpoint-'.join(map(str, missing))} did not reach {self.repo_id}: "
                           f"{'still uploading after ' + format(timeout, 'g') + ' s' if left else 'the upload failed'}; "
                           f"the local folder keeps {'them' if len(missing) > 1 else 'it'} unless rotated away")
        return missing


def hub_checkpoint_steps(api, repo_id: str, complete_only: bool = True) -> List[int]:
    """Steps of the checkpoints in ``repo_id``, oldest first: those with a complete marker whose files are all there
    (``complete_only``), or every ``checkpoints/checkpoint-<step>`` folder."""
    entries = {f.path: getattr(f, "size", None) for f in api.list_repo_tree(repo_id, recursive=True)
               if f.path.startswith(HUB_FOLDER + "/")}
    steps = set()
    for path in entries:
        parts = path.split("/")
        if len(parts) >= 3 and parts[1].startswith("checkpoint-") and parts[1][11:].isdigit():
            steps.add(int(parts[1][11:]))
    if complete_only:
        steps = {s for s in steps if _complete(api, repo_id, s, entries)}
    return sorted(steps)


def _complete(api, repo_id: str, step: int, entries: Dict[str, Optional[int]]) -> bool:
    from huggingface_hub import hf_hub_download

    folder = f"{HUB_FOLDER}/checkpoint-{step}"
    if f"{folder}/{MARKER}" not in entries:
        return False
    try:
        marker = json.loads(Path(hf_hub_download(repo_id, f"{folder}/{MARKER}", endpoint=api.endpoint, token=api.token)).read_text())
    except Exception:
        return False
    return all(entries.get(f"{folder}/{name}") == size for name, size in marker["files"].items())


def download_checkpoint(repo_id: str, output_dir: str, token: Optional[str] = None, api=None) -> Optional[Path]:
    """Downloads the newest complete checkpoint of ``repo_id`` into ``output_dir/checkpoint-<step>`` (through a
    hidden temp folder, moved into place when whole) and returns it; ``None`` when the repo holds none."""
    from huggingface_hub import HfApi, snapshot_download

    from .checkpointing import move_into_place

    api = api or HfApi(token=token)
    try:
        steps = hub_checkpoint_steps(api, repo_id)
    except Exception as e:
        raise UsageError(f"--resume_from_checkpoint {repo_id}: cannot list its checkpoints on the Hub "
                         f"({scrub(describe_exception(e), token)})") from None
    if not steps:
        return None
    name = f"checkpoint-{steps[-1]}"
    tmp = Path(output_dir) / f".{name}.download"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        snapshot_download(repo_id, allow_patterns=[f"{HUB_FOLDER}/{name}/*"], local_dir=str(tmp), endpoint=api.endpoint,
                          token=api.token)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"--resume_from_checkpoint {repo_id}: downloading {name} failed "
                         f"({scrub(describe_exception(e), token)})") from None
    source = tmp / HUB_FOLDER / name
    (source / MARKER).unlink()
    target = Path(output_dir) / name
    move_into_place(source, target)
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"Downloaded {name} from {repo_id}")
    return target
