"""
The needle-in-a-haystack records: what each one is keyed on, and the file that holds them.

A run appends one JSON line per (prompt, method), a cell, to results.jsonl as soon as that method has answered; a
rerun, on any machine, skips every cell the file already holds (load_done). A cell is named by everything its
answer depends on: identity() (the model by its files' content, its tokenizer and chat template, the haystack by its
text, every flag that moves a logit, the engine), the setting (length, noise), the prompt (depth, trial) and the
method (name, rule, heads). Calibration files and saved shared prefixes are named by a digest() of the same
identity, so a changed input never reads a stale file. A record is checked when read (check_record: a bad or edited
one is named by file and line), a failed write never leaves half a record, and one run at a time writes to a
folder (locked).
"""

import hashlib
import json
import math
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from model import check_folder, sha256_files
from tools.setup_weights import pid_alive

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what model.Tokenizer reads


def model_id(folder) -> str:
    """The identity of a checkpoint's weights: the sha256 of its config.json and every weights file, read one after
    another (a different checkpoint in a folder of the same name is a different model), hashed once per version of
    the files (model.sha256_files remembers it in a folder setup_weights.py built)."""
    folder = Path(folder)
    return sha256_files(folder, ["config.json", *sorted(p.name for p in folder.glob("*.safetensors"))])[:16]


def tokenizer_id(folder) -> str | None:
    """What the tokenizer adds to a checkpoint's identity: nothing (None) when the folder's MANIFEST.json vouches for
    its tokenizer files, else the sha256 of those files (the chat template is in tokenizer_config.json).

    setup_weights.py writes the tokenizer and the weights of a folder from one GGUF and lists both in the manifest,
    which every loader checks (model.check_folder): a file that differs from it is refused, so in such a folder the
    weights name the tokenizer too, and the identities of the packaged models (and every record made with them, the
    committed ones included) are what they were before tokenizers were covered. Any other folder (one converted
    elsewhere, or a copy whose manifest was removed after an edit) has its tokenizer hashed into every record."""
    folder = Path(folder)
    names = [n for n in TOKENIZER_FILES if (folder / n).exists()]
    if check_folder(folder, names):
        return None
    return sha256_files(folder, names)[:16]


def identity(args, model_fp: str, haystack_text: str, factor, tokenizer: str | None = None) -> dict:
    """Everything a record and a calibration depend on besides the prompt and the method: the checkpoint (model_id
    and, when its manifest does not vouch for it, tokenizer_id), the haystack, every flag that moves a token or a
    logit and the engine. A field at the value that earlier records were made with (no tokenizer of its own, the
    model.py engine) is left out, so they keep their cells."""
    return dict(model=model_fp, **({"tokenizer": tokenizer} if tokenizer else {}),
                haystack=hashlib.sha256(haystack_text.encode()).hexdigest()[:16], ntk=factor,
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


def load_done(results: Path, repair: bool = True) -> dict:
    """cell -> record. A torn last line (an interrupted write: text after the last newline that is not a record) is
    dropped with a warning naming the file and line, and with repair (a run, which appends next) cut off the file, as
    a whole last record's lost newline is put back; --summarize reads without repairing. Any other line that is not
    a record (not JSON, or not what check_record accepts) stops the run, naming the file, the line and the fault."""
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
            except ValueError as e:
                if not torn:
                    raise SystemExit(f"error: {results}, line {i + 1}: not a JSON record ({e}); remove or fix that "
                                     "line (every other line is a finished cell)") from None
                warnings.warn(f"{results}, line {i + 1}: a torn last line (an interrupted write) was dropped; "
                              "its cell runs again")
                if repair:
                    with open(results, "r+b") as f:
                        f.truncate(offset)
                break
            if fault := check_record(r):
                raise SystemExit(f"error: {results}, line {i + 1}: not a record of this experiment ({fault}); remove "
                                 "or fix that line (every other line is a finished cell)")
            done[r["cell"]] = r
            if torn and repair:  # a whole record whose newline was lost: complete it
                with open(results, "ab") as f:
                    f.write(b"\n")
        offset += len(raw) + 1
    return done


# What report.py and a resumed run read from a record: field -> (types, what a value must be).
FIELDS = {"cell": (str,), "model": (str,), "length": (int,), "noisy": (int,), "depth": (int, float),
          "trial": (int,), "method": (str,), "variant": (str,), "role": (str,), "heads": (list,), "score": (int,),
          "logprob": (int, float), "prefill_seconds": (int, float)}
ROLES = ("baseline", "rule", "random", "sweep", "extension")


def check_record(r) -> str | None:
    """Why r is not a record that run_setting writes (None when it is): a field report.py or a resumed run reads is
    missing or of another type, a value is impossible (a score other than 0 or 1, or one its answer contradicts; a
    log-probability above 0), or the record contradicts its own cell (the key it is found by: the identity's model,
    the setting, the prompt and the method), as an edited record would."""
    if not isinstance(r, dict):
        return f"a JSON {type(r).__name__}, not an object"
    for name, types in FIELDS.items():
        if name not in r:
            return f"no {name!r} field"
        v = r[name]
        if isinstance(v, bool) or not isinstance(v, types):
            return f"{name!r} is {v!r}, not {' or '.join(t.__name__ for t in types)}"
    if r["score"] not in (0, 1):
        return f"'score' is {r['score']!r}, not 0 or 1"
    if isinstance(r.get("answer"), str) and isinstance(r.get("expected"), str) and \
            r["score"] != int(r["expected"] in r["answer"]):
        return f"'score' is {r['score']} but the answer {r['answer']!r} {'holds' if r['score'] == 0 else 'lacks'} " \
               f"the expected {r['expected']!r}"
    if not math.isfinite(r["logprob"]) or r["logprob"] > 1e-6:
        return f"'logprob' is {r['logprob']!r}, not a log-probability (finite, <= 0)"
    if r["role"] not in ROLES:
        return f"'role' is {r['role']!r}, not one of {', '.join(ROLES)}"
    try:
        ident, *key = json.loads(r["cell"])
    except (ValueError, TypeError):
        return None  # a cell of another layout (report.py's own tests use names): nothing to compare with
    if not isinstance(ident, dict) or len(key) != 7:
        return None
    own = dict(model=ident.get("model"), length=key[0], noisy=key[1], depth=key[2], trial=key[3], method=key[4],
               rule=key[5], heads=key[6], ntk_factor=ident.get("ntk"), seed=ident.get("seed"),
               dtype=ident.get("dtype"))
    got = dict(r, model=r.get("model_id"), heads=[list(h) for h in r["heads"]])
    for name, want in own.items():
        if name in got and got[name] != want:
            field = "model_id" if name == "model" else name
            return f"{field!r} is {got[name]!r} but its cell says {want!r} (edited?)"
    return None


def read_calibration(path: Path, key: dict) -> dict | None:
    """A saved calibration (its spectra as float64 tensors) if path holds one computed for `key`, else None: a file
    of other settings, a damaged or a foreign one is reported and left to be recomputed (it is a cache)."""
    import torch

    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            saved["spectra"] = {c: torch.tensor(p, dtype=torch.float64) for c, p in saved["spectra"].items()}
            return saved
        warnings.warn(f"{path} was computed for other settings; recomputing it")
    except Exception as e:  # a truncated or foreign file
        warnings.warn(f"{path} is damaged ({type(e).__name__}: {e}); recomputing it")
    return None


def append_record(results: Path, rec: dict):
    """One line per finished cell, flushed to disk: an interruption loses at most the cell being written, and a
    write that fails (a full disk) is cut off again, so the file never ends in half a record."""
    line = (json.dumps(rec) + "\n").encode()
    with results.open("ab") as f:
        end = f.tell()
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            try:
                f.truncate(end)
                if end == 0:  # it held nothing before: not left behind empty
                    results.unlink()
            except OSError:  # then load_done drops the torn line on the next run
                pass
            raise OSError(e.errno, e.strerror, str(results)) from e  # the message names the file


def write_atomic(path: Path, write):
    """write(f) into a temporary file beside path, then rename it over path: a crash leaves the old file or none,
    and a process killed mid-write leaves a .<name>.<pid>.tmp that remove_stale_temporaries deletes."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e  # named by the file it was for
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path):
    """Delete the temporary files write_atomic left in folder when its process was killed (kill -9, a power cut):
    .<name>.<pid>.tmp whose pid no longer runs."""
    for p in Path(folder).glob(".*.tmp"):
        pid = p.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not pid_alive(int(pid)) and p.is_file():
            p.unlink(missing_ok=True)


@contextmanager
def locked(out: Path):
    """One run per --out at a time: an exclusive lock on out/.lock (flock: released by the kernel even when the run
    is killed), which holds the pid of its owner for the message another run prints. Raises SystemExit naming that
    process when the folder is taken."""
    import fcntl
    import socket

    path = Path(out) / ".lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise SystemExit(f"error: {out} is in use by {owner}: one run per --out at a time (wait for it, or give "
                             "another --out)") from None
        except OSError as e:  # a file system without locks (some network mounts)
            os.close(fd)
            warnings.warn(f"{path}: cannot lock ({e}); make sure no other run writes to {out}")
            yield
            return
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the owner that just finished removed it: lock the new one
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"eval_nih.py pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def run_folder(out: Path, results: Path):
    """A run's --out: made if absent (and removed again if the run fails before writing anything into it), locked
    for this run, cleared of killed writers' temporaries; yields the records it holds (load_done). A file that cannot
    be written (a full disk, a permission) ends the run in one line naming it, every finished record kept."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with locked(out):
            remove_stale_temporaries(out)
            yield load_done(results)
    except BaseException as e:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed run leaves nothing behind that was not there
        if isinstance(e, OSError):
            kept = len(load_done(results, repair=False)) if results.is_file() else 0
            print(f"eval_nih.py: error: {e}; the {kept} finished record{'s' * (kept != 1)} in {results} "
                  f"{'are' if kept != 1 else 'is'} kept: free the space (or fix the permission) and run the same "
                  "command to resume", file=sys.stderr)
            raise SystemExit(1) from None
        raise
