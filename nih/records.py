"""
The needle-in-a-haystack records: what each one is keyed on, and the file that holds them.

A run appends one JSON line per (prompt, method), a cell, to results.jsonl as soon as that method has answered; a
rerun, on any machine, skips every cell the file already holds (load_done). A cell is named by everything its
answer depends on: identity() (the model by its files' content, the haystack by its text, every flag that moves a
logit), the setting (length, noise), the prompt (depth, trial) and the method (name, rule, heads). Calibration files
and saved shared prefixes are named by a digest() of the same identity, so a changed input never reads a stale file.
"""

import hashlib
import json
import os
import warnings
from pathlib import Path


def file_digest(*paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def model_id(folder) -> str:
    """The identity of a checkpoint: its config and every weights file, by content (a different checkpoint in a
    folder of the same name is a different model)."""
    folder = Path(folder)
    return file_digest(folder / "config.json", *sorted(folder.glob("*.safetensors")))


def identity(args, model_fp: str, haystack_text: str, factor) -> dict:
    """Everything a record and a calibration depend on besides the prompt and the method."""
    return dict(model=model_fp, haystack=hashlib.sha256(haystack_text.encode()).hexdigest()[:16], ntk=factor,
                seed=args.seed, dtype=args.dtype, device=args.device.split(":")[0], chunk=args.chunk,
                max_new_tokens=args.max_new_tokens,
                **({"engine": f"transformers/{args.attn}"} if args.engine == "transformers" else
                   {"engine": "vllm"} if args.engine == "vllm" else {}),
                needle=args.needle, question=args.question, answer_prefix=args.answer_prefix)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def cell_id(ident: dict, length, noisy, depth, trial, m) -> str:
    """The key of one (prompt, method) cell: readable JSON, not a digest, so a record says what it was run with."""
    return json.dumps([ident, length, noisy, depth, trial, m.name, m.rule, [list(h) for h in m.heads]],
                      sort_keys=True)


def load_done(results: Path) -> dict:
    """cell -> record. A torn last line (an interrupted write: text after the last newline that is not a record) is
    dropped with a warning naming the file and line; any other line that is not a record stops the run, naming the
    file and line."""
    done = {}
    if not results.exists():
        return done
    lines = results.read_bytes().split(b"\n")
    offset = 0
    for i, raw in enumerate(lines):
        torn = i == len(lines) - 1  # no newline after it: the write did not finish
        if raw.strip():
            try:
                r = json.loads(raw)
                if not isinstance(r, dict) or "cell" not in r:
                    raise ValueError("not a record with a 'cell' field")
                done[r["cell"]] = r
                if torn:  # a whole record whose newline was lost: complete it
                    with open(results, "ab") as f:
                        f.write(b"\n")
            except ValueError as e:
                if not torn:
                    raise SystemExit(f"error: {results}, line {i + 1}: not a JSON record ({e}); remove or fix that "
                                     "line (every other line is a finished cell)") from None
                warnings.warn(f"{results}, line {i + 1}: a torn last line (an interrupted write) was dropped; "
                              "its cell runs again")
                with open(results, "r+b") as f:
                    f.truncate(offset)
        offset += len(raw) + 1
    return done


def append_record(results: Path, rec: dict):
    """One line per finished cell, flushed to disk: an interruption loses at most the cell being written."""
    with results.open("ab") as f:
        f.write((json.dumps(rec) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, write):
    """write(f) into a temporary file beside path, then rename it over path: a crash leaves the old file or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
