"""Bad inputs to the library API, one row each: the call, the exception it must raise (TypeError for a value of the
wrong type, ValueError for one out of range, FileNotFoundError for a missing file) and a regex its message must match
(naming the value or the file). Rows that were already errors stay here so they stay errors; GOOD lists the edge cases
that must keep working. A tiny random model covers the model API; the packaged SmolLM2 covers the real vocabulary."""

import json
import math
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dope import DopePlan, apply_dope, remove_dope
from nih.reuse import prefill_from
from model import Config, Tokenizer, Transformer
from tools.setup_weights import ensure_weights

VOCAB = 97
TINY = Config(vocab_size=VOCAB, n_embd=32, n_hidden=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=8, max_pos=64,
              tie_embeddings=False)
TINY_HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32,
           "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
           "max_position_embeddings": 64, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(TINY).eval()


@pytest.fixture(scope="module")
def smol():
    path = ensure_weights("smollm2")
    return SimpleNamespace(path=path, model=Transformer.from_pretrained(path, dtype=torch.float32))


@pytest.fixture
def c(tiny, smol, tmp_path):
    """What a row may use: the tiny model, SmolLM2, and folder(...) -> a loadable tiny HF folder to damage."""
    def folder(name="hf"):
        f = tmp_path / name
        f.mkdir()
        (f / "config.json").write_text(json.dumps(TINY_HF))
        save_file({f"model.{k}" if k != "lm_head.weight" else k: v.contiguous()
                   for k, v in tiny.state_dict().items()}, f / "model.safetensors")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smol.path / name, f / name)
        Transformer.from_pretrained(f)  # loads as it is: each row breaks one thing
        return f

    return SimpleNamespace(tiny=tiny, smol=smol.model, smol_path=smol.path, tmp=tmp_path, folder=folder)


def ids(*values):
    return torch.tensor([list(values)])


def edit(path, text=None, data=None):
    if data is not None:
        path.write_bytes(data)
    else:
        path.write_text(text)
    return path.parent


def index_with_two_shards(f):
    (f / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    return f


DAMAGED_WEIGHTS = r"hf does not match its MANIFEST\.json: model\.safetensors has sha256 [0-9a-f]{64}, the manifest says"

# (id, call, exception type, regex of the message)
BAD = [
    # model.generate / forward / prefill on the tiny model
    ("generate empty prompt", lambda c: c.tiny.generate(torch.zeros(1, 0, dtype=torch.long), 3),
     ValueError, r"empty prompt: .*shape \(1, 0\)"),
    ("generate max_new_tokens < 0", lambda c: c.tiny.generate(ids(1, 2), -3), ValueError, r"max_new_tokens.*-3"),
    ("generate max_new_tokens float", lambda c: c.tiny.generate(ids(1, 2), 2.5), TypeError, r"max_new_tokens.*2\.5"),
    ("generate two sequences", lambda c: c.tiny.generate(torch.zeros(2, 5, dtype=torch.long), 3),
     ValueError, r"one sequence at a time: idx has shape \(2, 5\)"),
    ("token id == vocab", lambda c: c.tiny(ids(1, 2, 97)), ValueError,
     r"token id 97 at \(batch, position\) \(0, 2\) is out of range: the vocabulary has 97 ids, 0\.\.96"),
    ("token id negative", lambda c: c.tiny(ids(5, -1, 3)), ValueError, r"token id -1 at .* \(0, 1\).* 97 ids"),
    ("token id >= vocab in generate", lambda c: c.tiny.generate(ids(1, 1000), 2), ValueError, r"token id 1000 "),
    ("token id >= vocab in prefill chunk 2", lambda c: c.tiny.prefill(ids(1, 2, 3, 500), c.tiny.new_cache(1, 8), 2),
     ValueError, r"token id 500 at \(batch, position\) \(0, 3\)"),
    ("float ids", lambda c: c.tiny(torch.ones(1, 3)), TypeError, r"torch\.float32"),
    ("uint8 ids", lambda c: c.tiny(torch.ones(1, 3, dtype=torch.uint8)), TypeError, r"torch\.uint8"),
    ("1-D ids", lambda c: c.tiny(torch.arange(5)), ValueError, r"shape \(batch, tokens\), got \(5,\)"),
    ("list ids", lambda c: c.tiny([[1, 2]]), TypeError, r"torch\.Tensor .* got list"),
    ("forward empty", lambda c: c.tiny(torch.zeros(1, 0, dtype=torch.long)), ValueError, r"empty prompt"),
    ("prefill chunk -1", lambda c: c.tiny.prefill(ids(1, 2, 3), c.tiny.new_cache(1, 8), chunk=-1),
     ValueError, r"chunk=-1"),
    ("prefill chunk 0", lambda c: c.tiny.prefill(ids(1, 2, 3), c.tiny.new_cache(1, 8), chunk=0), ValueError,
     r"chunk=0"),
    ("prefill chunk float", lambda c: c.tiny.prefill(ids(1, 2, 3), c.tiny.new_cache(1, 8), chunk=1.5),
     TypeError, r"chunk=1\.5"),
    ("prefill empty", lambda c: c.tiny.prefill(torch.zeros(1, 0, dtype=torch.long), c.tiny.new_cache(1, 8)),
     ValueError, r"empty prompt"),
    ("prefill_from hidden count", lambda c: prefill_from(c.tiny, ids(1, 2, 3), c.tiny.new_cache(1, 8), 2, 1,
                                                         [torch.zeros(1, 2, 32)]),
     ValueError, r"hidden holds 1 chunk states, but 3 tokens in chunks of 2 make 2"),
    ("prefill_from first out of range", lambda c: prefill_from(c.tiny, ids(1), c.tiny.new_cache(1, 8), 2, 5,
                                                               [torch.zeros(1, 1, 32)]),
     ValueError, r"first=5.*1\.\.1"),
    ("prefill_from first without hidden", lambda c: prefill_from(c.tiny, ids(1), c.tiny.new_cache(1, 8), 2, 1),
     ValueError, r"first=1"),
    ("cache max_len < 0", lambda c: c.tiny.new_cache(1, -4), ValueError, r"max_len=-4"),
    ("cache max_len float", lambda c: c.tiny.new_cache(1, 4.5), TypeError, r"max_len=4\.5"),
    ("cache full (already)", lambda c: c.tiny(ids(1, 2, 3, 4, 5), cache=c.tiny.new_cache(1, 4)), ValueError,
     r"KV cache of 4 positions is full: cannot add 5 at position 0"),
    ("cache rewind past its end (already)", lambda c: c.tiny.new_cache(1, 4).rewind(2), ValueError,
     r"cannot rewind a cache at position 0 to 2"),
    ("unknown rope_scaling (already)", lambda c: Transformer(Config(rope_scaling={"rope_type": "longrope"})),
     ValueError, r"'longrope'"),
    # the real vocabulary
    ("SmolLM2 token id 49152", lambda c: c.smol(ids(1, 49152)), ValueError,
     r"token id 49152 at .* \(0, 1\) .* the vocabulary has 49152 ids, 0\.\.49151"),
    ("SmolLM2 generate empty prompt", lambda c: c.smol.generate(torch.zeros(1, 0, dtype=torch.long), 5), ValueError,
     r"empty prompt"),
    ("SmolLM2 generate max_new_tokens -3", lambda c: c.smol.generate(ids(1, 2), -3), ValueError, r"-3"),
    ("SmolLM2 prefill chunk -1", lambda c: c.smol.prefill(ids(1, 2), c.smol.new_cache(1, 4), chunk=-1), ValueError,
     r"chunk=-1"),
    # DopePlan
    ("variant (already)", lambda c: DopePlan([(0, 0)], "noise"), ValueError, r"unknown DoPE variant 'noise'"),
    ("gaussian_form (already)", lambda c: DopePlan([(0, 0)], "gaussian", gaussian_form="v3"), ValueError,
     r"gaussian_form 'v3'"),
    ("float head", lambda c: DopePlan([(1.5, 0)]), TypeError, r"head \(1\.5, 0\): index 1\.5 is not an integer"),
    ("float head 2.0", lambda c: DopePlan([(0, 2.0)]), TypeError, r"index 2\.0 is not an integer"),
    ("numpy float head", lambda c: DopePlan([(np.float32(1), 0)]), TypeError, r"not an integer"),
    ("bool head", lambda c: DopePlan([(True, 0)]), TypeError, r"index True is not an integer"),
    ("str head", lambda c: DopePlan([("1", 0)]), TypeError, r"index '1' is not an integer"),
    ("negative head", lambda c: DopePlan([(0, -1)]), ValueError, r"head \(0, -1\): index -1 is negative"),
    ("negative layer", lambda c: DopePlan([(-2, 1)]), ValueError, r"index -2 is negative"),
    ("triple, not a pair", lambda c: DopePlan([(1, 2, 3)]), TypeError, r"\(layer, head\) pairs, got \(1, 2, 3\)"),
    ("heads an int", lambda c: DopePlan(5), TypeError, r"list of \(layer, head\) pairs, got 5"),
    ("heads a string", lambda c: DopePlan("0,1"), TypeError, r"got '0,1'"),
    ("layer out of range (already)", lambda c: apply_dope(c.tiny, DopePlan([(2, 0)], "all")), ValueError,
     r"\(2, 0\).*2 layers x 4 heads"),
    ("head out of range (already)", lambda c: apply_dope(c.tiny, DopePlan([(0, 4)], "all")), ValueError,
     r"heads \[\(0, 4\)\] do not exist"),
    ("sigma nan", lambda c: DopePlan([(0, 0)], "gaussian", sigma=float("nan")), ValueError, r"sigma=nan"),
    ("sigma inf", lambda c: DopePlan([(0, 0)], "gaussian", sigma=math.inf), ValueError, r"sigma=inf"),
    ("sigma 0", lambda c: DopePlan([(0, 0)], "gaussian", sigma=0), ValueError, r"sigma=0"),
    ("sigma < 0", lambda c: DopePlan([(0, 0)], "gaussian", sigma=-1.0), ValueError, r"sigma=-1\.0"),
    ("sigma str", lambda c: DopePlan([(0, 0)], "gaussian", sigma="1"), TypeError, r"sigma='1'"),
    ("seed float", lambda c: DopePlan([(0, 0)], "gaussian", seed=1.5), TypeError, r"seed must be an int.*seed=1\.5"),
    ("seed str", lambda c: DopePlan([(0, 0)], "gaussian", seed="42"), TypeError, r"seed='42'"),
    ("seed bool", lambda c: DopePlan([(0, 0)], "gaussian", seed=True), TypeError, r"seed=True"),
    ("seed 2**64", lambda c: DopePlan([(0, 0)], "gaussian", seed=2**64), ValueError, r"64 bits.*18446744073709551616"),
    ("native_len 0", lambda c: DopePlan([(0, 0)], native_len=0), ValueError, r"native_len=0"),
    ("native_len < 0", lambda c: DopePlan([(0, 0)], native_len=-8), ValueError, r"native_len=-8"),
    ("native_len float", lambda c: DopePlan([(0, 0)], native_len=8.5), TypeError, r"native_len=8\.5"),
    ("zero not a bool", lambda c: DopePlan([(0, 0)], zero="yes"), TypeError, r"zero must be True or False.*'yes'"),
    # Checkpoint folders
    ("no folder", lambda c: Transformer.from_pretrained(c.tmp / "nope"), FileNotFoundError,
     r"nope does not exist .* no config\.json or model\.safetensors"),
    ("empty folder", lambda c: Transformer.from_pretrained(c.tmp), FileNotFoundError,
     r"has no config\.json and no model\.safetensors"),
    ("no model.safetensors", lambda c: Transformer.from_pretrained(edit_unlink(c.folder(), "model.safetensors")),
     FileNotFoundError, r"hf has no model\.safetensors \(see weights\.md"),
    ("no config.json", lambda c: Transformer.from_pretrained(edit_unlink(c.folder(), "config.json")),
     FileNotFoundError, r"hf has no config\.json \("),
    ("corrupt config.json", lambda c: Transformer.from_pretrained(edit(c.folder() / "config.json", '{"vocab_size": ')),
     ValueError, r"hf/config\.json is not valid JSON"),
    ("binary config.json", lambda c: Transformer.from_pretrained(
        edit(c.folder() / "config.json", data=b"\xff\xfe\x00")), ValueError, r"hf/config\.json is not valid JSON"),
    ("config.json without a key", lambda c: Transformer.from_pretrained(
        edit(c.folder() / "config.json", json.dumps({k: v for k, v in TINY_HF.items() if k != "hidden_size"}))),
     ValueError, r"hf/config\.json is not a usable HF config: missing key 'hidden_size'"),
    ("config.json a list", lambda c: Transformer.from_pretrained(edit(c.folder() / "config.json", "[1, 2]")),
     ValueError, r"hf/config\.json is not a usable HF config"),
    ("unknown architecture (already)", lambda c: Transformer.from_pretrained(
        edit(c.folder() / "config.json", json.dumps(TINY_HF | {"architectures": ["MistralForCausalLM"]}))),
     ValueError, r"MistralForCausalLM"),
    ("truncated safetensors (already)", lambda c: Transformer.from_pretrained(
        truncate_file(c.folder() / "model.safetensors")), ValueError, r"corrupt safetensors file .*model\.safetensors"),
    ("missing shards", lambda c: Transformer.from_pretrained(index_with_two_shards(c.folder())), FileNotFoundError,
     r"missing weights files in .*hf: model-00001-of-00002\.safetensors, model-00002-of-00002\.safetensors"),
    ("corrupt index", lambda c: Transformer.from_pretrained(
        edit(c.folder() / "model.safetensors.index.json", "{oops")), ValueError,
     r"model\.safetensors\.index\.json is not valid JSON"),
    ("tokenizer: no tokenizer.json (already)", lambda c: Tokenizer(c.tmp), FileNotFoundError,
     r"no tokenizer\.json in "),
    ("tokenizer: corrupt tokenizer.json", lambda c: Tokenizer(edit(c.folder() / "tokenizer.json", '{"model": ')),
     ValueError, r"hf/tokenizer\.json is not a readable tokenizer"),
    ("tokenizer: corrupt tokenizer_config.json", lambda c: Tokenizer(
        edit(c.folder() / "tokenizer_config.json", "{,}")), ValueError, r"hf/tokenizer_config\.json is not valid JSON"),
    # A folder with a MANIFEST.json (setup_weights.py's) is checked against it at every load, by every loader
    ("4 KiB of the weights overwritten, manifest present", lambda c: Transformer.from_pretrained(
        overwrite(built(c.folder()) / "model.safetensors")), ValueError, DAMAGED_WEIGHTS),
    ("the same, reached through a symlink", lambda c: Transformer.from_pretrained(
        symlink(overwrite(built(c.folder()) / "model.safetensors"))), ValueError, r"link does not match its MANIFEST"),
    ("the same, through transformers", lambda c: hf_model(overwrite(built(c.folder()) / "model.safetensors")),
     ValueError, DAMAGED_WEIGHTS),
    ("head count edited, shapes agree (8 heads of 4, not 4 of 8)", lambda c: Transformer.from_pretrained(
        edit(built(c.folder()) / "config.json", json.dumps(TINY_HF | {"num_attention_heads": 8,
                                                                      "num_key_value_heads": 4, "head_dim": 4}))),
     ValueError, r"config\.json has sha256 [0-9a-f]{64}, the manifest says [0-9a-f]{64} \(damaged or edited\)"),
    ("chat template edited", lambda c: Tokenizer(edit_template(built(c.folder()) / "tokenizer_config.json")),
     ValueError, r"tokenizer_config\.json has sha256 .* delete MANIFEST\.json to use these files as another model"),
    ("tokenizer.json deleted", lambda c: Transformer.from_pretrained(
        edit_unlink(built(c.folder()), "tokenizer.json")), ValueError, r"MANIFEST\.json: tokenizer\.json is missing"),
    ("a folder where tokenizer.json was", lambda c: Transformer.from_pretrained(
        mkdir_at(built(c.folder()) / "tokenizer.json")), ValueError, r"tokenizer\.json is not a file"),
    ("weights added after the build", lambda c: Transformer.from_pretrained(
        copy_as(built(c.folder()) / "model.safetensors", "extra.safetensors")), ValueError,
     r"extra\.safetensors is not in it \(added after the folder was built\)"),
    ("manifest not JSON", lambda c: Transformer.from_pretrained(edit(built(c.folder()) / "MANIFEST.json", "{")),
     ValueError, r"MANIFEST\.json is not valid JSON"),
    ("manifest without sizes", lambda c: Transformer.from_pretrained(
        edit(built(c.folder()) / "MANIFEST.json", '{"files": {"config.json": {"sha256": "00"}}}')), ValueError,
     r"MANIFEST\.json is not a manifest of file sizes and sha256s \(KeyError"),
    # configs no model can be built from (they were assertions, shape errors deep in a forward, or ran)
    ("heads that do not divide, in config.json", lambda c: Transformer.from_pretrained(
        edit(c.folder() / "config.json", json.dumps(TINY_HF | {"num_key_value_heads": 3}))), ValueError,
     r"hf/config\.json is not a usable HF config: config n_head=4 query heads cannot share n_kv_head=3 KV heads"),
    ("heads that do not divide", lambda c: Config(n_head=9, n_kv_head=4), ValueError, r"n_head=9 .* n_kv_head=4"),
    ("odd head_dim", lambda c: Config(head_dim=7), ValueError, r"head_dim=7 is odd"),
    ("n_layer a string", lambda c: Config(n_layer="2"), TypeError, r"n_layer must be an int, got n_layer='2'"),
    ("vocab_size 0", lambda c: Config(vocab_size=0), ValueError, r"vocab_size must be >= 1, got vocab_size=0"),
    ("rope_theta < 0", lambda c: Config(rope_theta=-1.0), ValueError, r"rope_theta must be a finite number > 0"),
    ("eos id past the vocabulary", lambda c: Config(vocab_size=100, eos_token_ids=[100]), ValueError,
     r"eos_token_ids: 100 is not a token id of the 100-id vocabulary"),
    ("hidden_size not a multiple of the heads", lambda c: Config.from_hf(
        {k: v for k, v in TINY_HF.items() if k != "head_dim"} | {"num_attention_heads": 5, "num_key_value_heads": 5}),
     ValueError, r"hidden_size 32 is not a multiple of num_attention_heads 5"),
    # a tokenizer that cannot belong to the weights, refused before any prompt
    ("tokenizer larger than the embedding", lambda c: Tokenizer(c.folder()).check_fits(TINY), ValueError,
     r"tokenizer\.json has 49152 token ids but the model's vocab_size is 97: this tokenizer does not belong"),
    ("eos_token the tokenizer lacks", lambda c: Tokenizer(edit(c.folder() / "tokenizer_config.json", json.dumps(
        {"eos_token": "<|nope|>"}))), ValueError, r"names eos_token '<\|nope\|>', which .*tokenizer\.json does not"),
    # transformers: the same checks as model.py, before transformers sees the folder or the ids
    ("transformers: mismatched shapes", lambda c: hf_model(edit(c.folder() / "config.json", json.dumps(
        TINY_HF | {"intermediate_size": 48}))), ValueError, r"hf does not match its config:\n  mis-shaped: layers\.0"),
    ("transformers: token id == vocab", lambda c: hf_model(c.folder())(ids(1, 97)), ValueError,
     r"token id 97 at \(batch, position\) \(0, 1\) is out of range: the vocabulary has 97 ids"),
    ("transformers: float ids", lambda c: hf_model(c.folder())(torch.ones(1, 3)), TypeError, r"torch\.float32"),
    ("transformers: a plan switched on mid-cache", lambda c: plan_mid_cache(hf_model(c.folder())), ValueError,
     r"layer 1 writes 4 heads per position into a cache whose 3 positions hold 2: install or remove a DoPE plan"),
    ("transformers: a plan switched off mid-cache", lambda c: plan_mid_cache(hf_model(c.folder()), on=False),
     ValueError, r"layer 1 writes 2 heads per position into a cache whose 3 positions hold 4"),
    ("a plan switched on mid-cache", lambda c: plan_mid_cache(Transformer.from_pretrained(c.folder())), ValueError,
     r"layer 1 writes keys of \(heads, width\) \(4, 8\) into a cache whose 3 positions hold \(2, 8\)"),
]


def built(f):
    """The folder as setup_weights.py finishes one: MANIFEST.json, the size and sha256 of every file, written last."""
    from tools.setup_weights import MODELS, write_manifest

    write_manifest(f, MODELS["smollm2"], "bf16")
    return f


def overwrite(path, n=4096):
    """n bytes of the tensor data (not the header) overwritten in place, the file's size unchanged."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size - 2 * n)
        f.write(b"\x55" * n)
    return path.parent


def symlink(folder):
    (folder.parent / "link").symlink_to(folder)
    return folder.parent / "link"


def edit_template(path):
    """One word of the chat template changed, the file's size kept: only its content tells."""
    text = path.read_text()
    assert "You are a helpful" in json.loads(text)["chat_template"]
    path.write_text(text.replace("You are a helpful", "You are a harmful"))
    return path.parent


def mkdir_at(path):
    path.unlink()
    path.mkdir()
    return path.parent


def copy_as(path, name):
    shutil.copy(path, path.parent / name)
    return path.parent


def hf_model(folder):
    from engines.hf_dope import HFModel

    return HFModel.from_pretrained(folder, dtype=torch.float32)


def plan_mid_cache(model, on=True):
    """Prefill three positions with (on=False) or without a plan, then switch it and run one more."""
    plan, cache = DopePlan([(1, 0)], "all"), model.new_cache(1, 8)
    if not on:
        apply_dope(model, plan)
    model(ids(1, 2, 3), cache=cache)
    remove_dope(model) if not on else apply_dope(model, plan)
    try:
        return model(ids(4), cache=cache)
    finally:
        remove_dope(model)


def edit_unlink(folder, name):
    (folder / name).unlink()
    return folder


def truncate_file(path):
    path.write_bytes(path.read_bytes()[:-1000])
    return path.parent


@pytest.mark.parametrize("call, exc, message", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_is_a_clear_error(c, call, exc, message):
    with pytest.raises(exc) as err:
        call(c)
    assert err.type is exc, f"{err.type.__name__}: {err.value}"
    assert re.search(message, str(err.value)), str(err.value)


# Edge cases that are valid and must keep working.
GOOD = [
    ("generate 0 new tokens", lambda c: c.tiny.generate(ids(1, 2), 0) == []),
    ("generate numpy max_new_tokens", lambda c: len(c.tiny.generate(ids(1, 2), np.int64(2))) <= 2),
    ("prefill chunk larger than the prompt", lambda c: c.tiny.prefill(ids(1, 2), c.tiny.new_cache(1, 4), 4096)
     .shape == (1, 1, VOCAB)),
    ("int32 ids and the last id", lambda c: c.tiny(torch.tensor([[0, VOCAB - 1]], dtype=torch.int32)).shape
     == (1, 1, VOCAB)),
    ("SmolLM2 last id", lambda c: c.smol(ids(0, 49151)).shape == (1, 1, 49152)),
    ("heads from numpy and torch ints, lists, duplicates",
     lambda c: DopePlan([(np.int64(1), torch.tensor(2)), [0, 3], (0, 3)]).heads == [(0, 3), (1, 2)]),
    ("no heads", lambda c: DopePlan([]).heads == []),
    ("sigma an int, seed negative, native_len numpy",
     lambda c: DopePlan([(0, 0)], "gaussian", sigma=2, seed=-5, native_len=np.int64(16)).sigma == 2),
    ("a plan on the tiny model runs", lambda c: apply_dope(c.tiny, DopePlan([(1, 3)], "gaussian", sigma=0.5))
     (ids(1, 2, 3)).isfinite().all() and apply_dope(c.tiny, DopePlan([], "all")) is c.tiny),
]


@pytest.mark.parametrize("call", [row[1] for row in GOOD], ids=[row[0] for row in GOOD])
def test_valid_edge_cases_still_work(c, call):
    assert call(c)


def test_model_main_default_resolves_against_the_project(tmp_path):
    """`python model.py` from another folder looks for weights/ next to model.py, not in the working directory."""
    import subprocess
    import sys
    from pathlib import Path

    from tools import setup_weights

    project = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(project / "model.py"), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    # argparse wraps the help at spaces and after hyphens: compare without any whitespace
    assert "".join(str(setup_weights.DEFAULT_MODEL_DIR).split()) in "".join(run.stdout.split()), run.stdout
    assert setup_weights.DEFAULT_MODEL_DIR.is_absolute()


@pytest.mark.parametrize("damage, message", [
    (lambda f: overwrite(built(f) / "model.safetensors"), r"hf does not match its MANIFEST\.json: model\.safetensors"),
    (lambda f: f, r"tokenizer\.json has 49152 token ids but the model's vocab_size is 97"),
], ids=["weights overwritten, manifest present", "tokenizer of another vocabulary"])
def test_model_main_refuses_a_folder_in_one_line(c, capsys, damage, message):
    """`python model.py --model DIR` checks what from_pretrained and the tokenizer check, before any prompt runs,
    and says what is wrong in one line (exit 1), not a traceback."""
    import model

    folder = damage(c.folder())
    with pytest.raises(SystemExit) as exit:
        model.main(["--model", str(folder), "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert exit.value.code == 1 and err.startswith("model.py: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
