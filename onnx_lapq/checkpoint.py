"""The file of ``--checkpoint PATH``: a lapq run's search journal (journal.py), written
atomically as the run goes and read back by ``--resume``.

An existing file is replaced only when it is a checkpoint itself (of an earlier run, with a
warning); anything else at PATH is refused before any work.
"""
from __future__ import annotations

import logging
import os

from .errors import CheckpointError
from .journal import SearchJournal
from .modelio import save_text_atomic

log = logging.getLogger(__name__)


class CheckpointFile:
    """The --checkpoint file of a lapq run: its search journal, read back with --resume, and
    written atomically every ``every`` evaluations it records and when the run stops early."""

    def __init__(self, path: str, every: int, resume: bool):
        self.path, self.every = path, every
        self.journal = self._read() if resume else SearchJournal()
        self.journal.on_record = self._recorded
        self.saved = len(self.journal.entries)
        if not resume and os.path.exists(path):
            text = self._text()
            try:
                SearchJournal.from_text(text)
            except CheckpointError:
                raise CheckpointError(
                    f"--checkpoint {path!r} exists and is not an onnx_lapq checkpoint: choose another path (only an earlier checkpoint is replaced)"
                ) from None
            log.warning("--checkpoint %r holds an earlier run, which this one replaces: add --resume to continue that run instead", path)

    def _read(self) -> SearchJournal:
        if not os.path.isfile(self.path):
            raise CheckpointError(f"--resume: there is no checkpoint at {self.path!r} to resume: check the path, or start over without --resume")
        return SearchJournal.from_text(self._text(), source=f"--checkpoint {self.path!r}")

    def _text(self) -> bytes:
        try:
            with open(self.path, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise CheckpointError(f"--checkpoint {self.path!r} cannot be read ({exc.strerror}): check its permissions") from None

    def _recorded(self, journal: SearchJournal) -> None:
        if len(journal.entries) % self.every == 0:
            self.save()

    def save(self) -> None:
        """Write the journal if it recorded evaluations since it was last read or written."""
        if len(self.journal.entries) > self.saved:
            save_text_atomic(self.journal.to_text(), self.path)
            self.saved = len(self.journal.entries)

    def remove(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)
