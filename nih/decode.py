"""
How a cell of the grid is answered once its prompt is in the cache: the right answer's teacher-forced log-probability,
then a greedy answer that stops at a newline (the paper's NIH protocol), as the cell's method computes.
"""

import time

import torch

from nih.reuse import as_method


@torch.inference_mode()
def answer_logprob(model, cache, logits, answer: list) -> float:
    """log p(answer tokens | prompt), teacher-forced: logits (1, 1, vocab) are the prompt's last position; one
    forward over answer[:-1] continues the cache, which is then rewound, so greedy decoding can follow."""
    start = cache.pos
    lp = torch.log_softmax(logits[0, -1].double(), -1)[answer[0]]
    if len(answer) > 1:
        more = model(torch.tensor([answer[:-1]], device=logits.device), cache=cache, all_logits=True)  # (1, n-1, V)
        tgt = torch.tensor(answer[1:], device=logits.device)[:, None]
        lp = lp + torch.log_softmax(more[0].double(), -1).gather(-1, tgt).sum()
    cache.rewind(start)
    return float(lp)


@torch.inference_mode()
def answer_and_decode(model, head_set, cache, logits, answer, prompt_ids, max_new_tokens, stop, seed) -> dict:
    """With the prompt in the cache: the answer's teacher-forced log-probability, then greedy decoding, as the head
    set computes (its DoPE plan, or its extension: nih/reuse.as_method)."""
    t0 = time.time()
    with as_method(model, head_set, seed):
        lp = answer_logprob(model, cache, logits, answer)
        new = model.generate(prompt_ids, max_new_tokens, stop, cache=cache, logits=logits)
    return dict(new=new, logprob=lp, decode_seconds=time.time() - t0)


def stop_tokens(tok, cfg) -> set:
    """EOS, and every token whose text holds a newline: the paper stops at a newline."""
    stop = {tok.eos_id, *cfg.eos_token_ids} - {None}
    return stop | {i for t, i in tok.tok.get_vocab().items() if "\n" in tok.decode([i])}
