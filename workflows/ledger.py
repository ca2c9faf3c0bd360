"""The run ledger: one SQLite file in the output directory saying, per image, what was done with
which inputs, configuration and model, how long it took, what it found, or why it failed.

A result is recorded as done only after its files were renamed into place, and an image counts as
done on a later run only while its fingerprint, configuration and outputs are unchanged.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from models.card import CARD_FILENAME, load_card
from pipeline.writers import outputs_damage

LEDGER_NAME = "ledger.sqlite"
LOCK_NAME = ".seamline.lock"

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    path TEXT PRIMARY KEY,
    size INTEGER, mtime_ns INTEGER, sha256 TEXT,
    config_hash TEXT, model_hash TEXT,
    status TEXT NOT NULL,
    output_dir TEXT,
    started REAL, finished REAL, seconds REAL,
    instances INTEGER, counts TEXT, tiles INTEGER, tiles_skipped INTEGER, batches_resumed INTEGER,
    error TEXT, warnings TEXT, summary_sha256 TEXT
)
"""
ADDED_COLUMNS = {"summary_sha256": "TEXT"}  # columns a ledger written by an earlier version lacks


class LedgerLocked(RuntimeError):
    """Another run holds this output directory."""


class LedgerError(ValueError):
    """The ledger file cannot be read (not an SQLite database, or damaged)."""


@dataclass(frozen=True)
class Fingerprint:
    size: int
    mtime_ns: int
    sha256: str | None = None


def fingerprint(path: Path, content: bool = False) -> Fingerprint:
    """Size and modification time, plus the SHA-256 of the content when asked."""
    stat = path.stat()
    digest = None
    if content:
        sha = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        digest = sha.hexdigest()
    return Fingerprint(stat.st_size, stat.st_mtime_ns, digest)


def model_files(model_dir: Path) -> list[Path]:
    """The files a model's results depend on: its card, the weights file it names (wherever in the
    folder, whatever its suffix) and every other top-level weights file."""
    model_dir = Path(model_dir)
    named = [model_dir / load_card(model_dir).weights] if (model_dir / CARD_FILENAME).is_file() else []
    top = [p for p in model_dir.iterdir() if p.suffix in {".yaml", ".safetensors", ".pt", ".pth"}]
    return sorted({p for p in [*top, *named] if p.is_file()})


def model_hash(model_dir: Path) -> str:
    """SHA-256 over the model's files (``model_files``)."""
    sha = hashlib.sha256()
    for file in model_files(model_dir):
        sha.update(file.relative_to(model_dir).as_posix().encode())
        sha.update(file.read_bytes())
    return sha.hexdigest()


def _summary_digest(folder: Path) -> str | None:
    """SHA-256 of an image's ``counts.json`` (unique to the run that wrote it); None without one."""
    try:
        return hashlib.sha256((folder / "counts.json").read_bytes()).hexdigest()
    except OSError:
        return None


def config_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


@contextmanager
def run_lock(out_dir: Path):
    """Hold an exclusive lock on ``out_dir`` for the block; a second run fails at once."""
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = open(out_dir / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise LedgerLocked(f"{out_dir}: another Seamline run is using this output directory") from err
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def run_alive(out_dir: Path) -> bool:
    """Whether the process that last took ``out_dir``'s lock (its PID is in the lock file) still
    runs on this machine: rows it left ``running`` are otherwise from a run that was killed."""
    try:
        os.kill(int((out_dir / LOCK_NAME).read_text().split()[0]), 0)
    except PermissionError:  # alive, another user's
        return True
    except (OSError, ValueError, IndexError):
        return False
    return True


class Ledger:
    """Per-image records in ``OUT/ledger.sqlite`` (WAL mode: ``seamline status`` can read during a run)."""

    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / LEDGER_NAME
        self.db = sqlite3.connect(self.path, timeout=30)
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(SCHEMA)
            present = {row["name"] for row in self.db.execute("PRAGMA table_info(images)")}
            for column, kind in ADDED_COLUMNS.items():
                if column not in present:
                    self.db.execute(f"ALTER TABLE images ADD COLUMN {column} {kind}")
            self.db.execute("SELECT count(*) FROM images").fetchone()
            self.db.commit()
        except sqlite3.DatabaseError as err:
            self.db.close()
            raise LedgerError(
                f"{self.path}: not a readable ledger ({err}); move it aside and run again to start a new one "
                "(every image is then processed again; the results in its folders stay until rewritten)"
            ) from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, path: Path) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM images WHERE path = ?", (str(path),)).fetchone()

    def rows(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM images ORDER BY path").fetchall()

    def is_current(self, path: Path, print_: Fingerprint, config: str, model: str) -> bool:
        """Done before with the same file, configuration and model, and its outputs still there,
        whole (``writers.outputs_damage``) and those this ledger recorded (not rewritten since by
        a plain ``seamline run`` into the folder, say); also when it was withdrawn since: listed
        again, it is served again without being redone."""
        row = self.get(path)
        if row is None or row["status"] not in ("done", "withdrawn") or (row["config_hash"], row["model_hash"]) != (config, model):
            return False
        if print_.sha256 is not None:
            unchanged = row["sha256"] == print_.sha256
        else:
            unchanged = (row["size"], row["mtime_ns"]) == (print_.size, print_.mtime_ns)
        folder = self.folder(row)
        if not unchanged or folder is None or outputs_damage(folder) is not None:
            return False
        return row["summary_sha256"] in (None, _summary_digest(folder))  # None: recorded before digests were kept

    def folder(self, row: sqlite3.Row) -> Path | None:
        """An image's output folder, in the output directory where this ledger is now (moved or not)."""
        return self.path.parent / Path(row["output_dir"]).name if row["output_dir"] else None

    def _upsert(self, path: Path, **values) -> None:
        columns = ["path", *values]
        placeholders = ", ".join("?" for _ in columns)
        updates = ", ".join(f"{c} = excluded.{c}" for c in values)
        self.db.execute(
            f"INSERT INTO images ({', '.join(columns)}) VALUES ({placeholders}) ON CONFLICT(path) DO UPDATE SET {updates}",
            (str(path), *values.values()),
        )
        self.db.commit()

    def started(self, path: Path, print_: Fingerprint, config: str, model: str, output_dir: Path) -> None:
        self._upsert(
            path, size=print_.size, mtime_ns=print_.mtime_ns, sha256=print_.sha256, config_hash=config,
            model_hash=model, status="running", output_dir=output_dir.name, started=time.time(),
            finished=None, seconds=None, error=None, warnings=None,
        )

    def warned(self, path: Path, message: str) -> None:
        row = self.get(path)
        previous = row["warnings"] if row and row["warnings"] else ""
        self._upsert(path, status=row["status"] if row else "pending", warnings=f"{previous}{message}\n")

    def done(self, path: Path, summary: dict) -> None:
        """``seconds``: the time its tiles took to segment (model and polygons), summed over the
        threads that ran them (images of a run interleave: their wall times overlap)."""
        row = self.get(path)
        folder = self.folder(row) if row is not None else None
        self._upsert(
            path, status="done", finished=time.time(), seconds=summary.get("segment_seconds"),
            summary_sha256=_summary_digest(folder) if folder is not None else None,
            instances=summary["instances"], counts=json.dumps(summary["counts"]), tiles=summary.get("tiles"),
            tiles_skipped=summary.get("tiles_skipped"), batches_resumed=summary.get("batches_resumed", 0), error=None,
        )

    def failed(self, path: Path, error: str) -> None:
        """No current result: the counts of an earlier success are cleared (its files are kept, not served)."""
        self._upsert(path, status="failed", finished=time.time(), error=error, instances=None, counts=None,
                     tiles=None, tiles_skipped=None, batches_resumed=None)

    def retire_missing(self, present: set[str]) -> list[tuple[str, str]]:
        """Retire the images recorded here that are not among ``present`` (this run's inputs):
        ``missing`` when their file is gone (deleted or renamed), ``withdrawn`` when it is still there
        but no longer an input (left out of the manifest, the paths or the patterns). Returns (path, status)."""
        retired = []
        for row in self.rows():
            if row["path"] in present or row["status"] in ("missing", "withdrawn"):
                continue
            status = "withdrawn" if Path(row["path"]).exists() else "missing"
            why = "no longer among the workflow's inputs" if status == "withdrawn" else "the file is gone (deleted, moved or renamed)"
            self._upsert(Path(row["path"]), status=status, error=why)
            retired.append((row["path"], status))
        return retired

    def reinstate(self, path: Path) -> None:
        """Serve again the results of an image listed again (``is_current`` held them as they were)."""
        row = self.get(path)
        if row is not None and row["status"] == "withdrawn":
            self._upsert(path, status="done", error=None)

    def served_folders(self) -> set[str]:
        """Output folders whose results stand: images done, and images being processed again whose
        previous run succeeded (their files are replaced only once the new ones are complete)."""
        return {self.folder(row).name for row in self.rows() if row["output_dir"] and (
            row["status"] == "done" or (row["status"] == "running" and row["instances"] is not None))}
