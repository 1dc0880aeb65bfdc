"""
The cells of one needle-in-a-haystack setting answered by vLLM (eval_nih.py --engine vllm, run with the python of
the vLLM environment, `bash .ci/vllm_env`): the same prompts, methods and records as model.py's run_prompts.

One engine per setting (engines/vllm_dope.VllmDope), its layers with keys per query head the union of every method's;
each head set is installed in turn and answers all its prompts as one batch. vLLM's automatic prefix caching replaces
nih/reuse.py: within a head set, the prompts share the haystack before their needles (the deepest needle's prompt
runs first), and the decoding shares the teacher-forced request's prompt. The answer's teacher-forced log-probability comes from vLLM's prompt log-probabilities
(VllmDope.answer_logprobs), computed before the greedy answer. Heads are still picked on model.py (calibration needs
q and k before rotation, which vLLM does not show).

A record's prefill_seconds and decode_seconds are its share of its head set's batch (the teacher-forced requests,
then the greedy ones: vLLM runs a batch's requests together), so that their sum over a setting is the time spent;
tail_tokens is what vLLM computed of the prompt (the rest was in its prefix cache); first_layer is 0.
"""

import time

from dope import DopePlan
from nih.reuse import BASELINE


def run_prompts(path, factor, todo, answer_of, *, length: int, extra: int, max_new_tokens: int, stop, seed: int,
                dtype: str, reuse: str):
    """Yields (key, method, output) for every cell of todo = [(key, prompt, methods)], one head set at a time, as
    nih/reuse.run_prompts does; answer_of(prompt) is the answer's token ids, stop the tokens that end an answer
    (dropped from it, as model.generate does)."""
    from engines.vllm_dope import VllmDope  # vllm: only in its own environment

    if not todo:
        return
    sets = list(dict.fromkeys([BASELINE] + [m.head_set for _, _, need in todo for m in need]))
    layers = sorted({layer for _, heads in sets for layer, _ in heads})
    engine = VllmDope(path, layers=layers, rope_scaling={"rope_type": "ntk", "factor": factor} if factor else {},
                      dtype=dtype, max_model_len=length + extra, skip_tokenizer_init=True,
                      enable_prefix_caching=reuse == "prefix")
    try:
        for variant, heads in sets:
            cells = [(key, p, [m for m in need if m.head_set == (variant, heads)]) for key, p, need in todo]
            cells = [c for c in cells if c[2]]
            if not cells:
                continue
            if heads:
                engine.install(DopePlan(list(heads), variant, seed=seed))
            elif engine.plan is not None:
                engine.remove()
            t0 = time.time()
            ids, answers = [p.ids for _, p, _ in cells], [answer_of(p) for _, p, _ in cells]
            # the deepest needle's prompt first, alone: the others then find the haystack before their needles in
            # the prefix cache (requests of one batch are computed side by side, none reads another's blocks)
            scored = engine.answer_logprobs(ids[:1], answers[:1], with_cached=True)
            scored += engine.answer_logprobs(ids[1:], answers[1:], with_cached=True) if len(ids) > 1 else []
            t1 = time.time()
            greedy = engine.generate(ids, max_new_tokens, stop)
            t2 = time.time()
            for (key, p, need), (lp, cached), a in zip(cells, scored, greedy):
                new = a["tokens"][:-1] if a["tokens"] and a["tokens"][-1] in stop else a["tokens"]
                out = dict(new=new, logprob=lp, prefill_seconds=(t1 - t0) / len(cells),
                           decode_seconds=(t2 - t1) / len(cells), first_layer=0, tail_tokens=len(p.ids) - cached)
                for m in need:
                    yield key, m, out
    finally:
        del engine
