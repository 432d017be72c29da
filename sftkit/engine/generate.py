"""Generation from a template: one streamed answer (stoppable), or many for scoring."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ..core.template import Template


@dataclass(frozen=True)
class Answer:
    text: str
    new_tokens: int
    seconds: float
    stopped: bool  # True when Stop ended it before the model finished


def _stopping(stop_event: threading.Event | None):
    from transformers import StoppingCriteria, StoppingCriteriaList

    if stop_event is None:
        return None

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), stop_event.is_set(), dtype=torch.bool,
                              device=input_ids.device)

    return StoppingCriteriaList([_Stop()])


def _streamer(tokenizer, on_text: Callable[[str], None] | None):
    if on_text is None:
        return None
    from transformers import TextStreamer

    class _Callback(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                on_text(text)

    return _Callback(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 64,
                  on_text: Callable[[str], None] | None = None,
                  stop_event: threading.Event | None = None,
                  do_sample: bool = False, temperature: float = 0.7) -> Answer:
    """Greedy (or sampled) continuation of ``prompt``; ``on_text`` receives pieces as they come."""
    import torch

    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    started = time.perf_counter()
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if do_sample:  # temperature only (no top-k/top-p from the model's generation config): as the prefix path draws
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    from .compare import FORWARD_DECODED_TYPES, NO_CACHE_TYPES, _active_peft_type, _stop_ids, decode_by_forward

    kind = _active_peft_type(model)
    if kind in FORWARD_DECODED_TYPES:  # a prefix: full forwards, as training computes (compare.py says why)
        shown = [""]

        def stream(new: list[int]) -> None:
            text = tokenizer.decode(new, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # a character whose bytes are not all there yet: wait for the rest
                return
            if on_text is not None and text.startswith(shown[0]) and len(text) > len(shown[0]):
                on_text(text[len(shown[0]):])
            shown[0] = text

        new = decode_by_forward(model, enc["input_ids"][0].tolist(), max_new_tokens, _stop_ids(model, tokenizer),
                                temperature=temperature if do_sample else None,  # torch's global generator, as
                                stop_event=stop_event, on_token=stream)  # generate draws from it
        return Answer(text=tokenizer.decode(new, skip_special_tokens=True), new_tokens=len(new),
                      seconds=time.perf_counter() - started,
                      stopped=bool(stop_event is not None and stop_event.is_set()))
    if kind in NO_CACHE_TYPES:  # soft prompts generate wrongly through the cache
        kwargs["use_cache"] = False
    stops = sorted(_stop_ids(model, tokenizer))
    if stops:  # every stop token, as the comparison's answers (none known: the generation config's default)
        kwargs["eos_token_id"] = stops
    with torch.no_grad():
        out = model.generate(**enc, streamer=_streamer(tokenizer, on_text),
                             stopping_criteria=_stopping(stop_event), **kwargs)
    new = out[0, enc["input_ids"].shape[1]:]
    return Answer(
        text=tokenizer.decode(new, skip_special_tokens=True),
        new_tokens=int(new.shape[0]),
        seconds=time.perf_counter() - started,
        stopped=bool(stop_event is not None and stop_event.is_set()),
    )


def answer_row(model, tokenizer, template: Template, row: dict, *, few_shot: bool = True,
               **kwargs) -> Answer:
    """The model's answer to one data row under ``template`` (zero-shot if few_shot=False)."""
    prompt = template.prompt_text(row, tokenizer, with_examples=few_shot)
    return generate_text(model, tokenizer, prompt, **kwargs)


def answer_rows(model, tokenizer, template: Template, rows: Sequence[dict], *, few_shot: bool = True,
                max_new_tokens: int = 48, batch_size: int = 16) -> list[str]:
    """Greedy answers for many rows, batched with left padding. They end at any of the model's stop tokens;
    a soft prompt generates without the KV cache (it goes wrong through it), a prefix by full forwards one
    row at a time: the same generation the comparison scores with."""
    from .compare import _generate

    prompts = [template.prompt_text(r, tokenizer, with_examples=few_shot) for r in rows]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            answers += _generate(model, tokenizer, prompts[i:i + batch_size], max_new_tokens)[0]
    finally:
        tokenizer.padding_side = old_side
    return answers


@dataclass(frozen=True)
class PromptScore:
    mode: str  # "zero-shot" | "few-shot"
    n: int
    mean: float
    ci_low: float
    ci_high: float
    answers: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.mode}: {self.mean:.1%} (95% CI {self.ci_low:.1%}-{self.ci_high:.1%}, n={self.n})"


def score_prompting(model, tokenizer, template: Template, rows: Sequence[dict],
                    scorer: Callable[[str, dict], float], *, few_shot: bool, **kwargs) -> PromptScore:
    """Accuracy of prompting alone on ``rows``, with a Wilson 95% interval."""
    from ..core.stats import wilson_interval

    answers = answer_rows(model, tokenizer, template, rows, few_shot=few_shot, **kwargs)
    scores = [scorer(a, r) for a, r in zip(answers, rows)]
    k = sum(scores)
    lo, hi = wilson_interval(k, len(scores))
    return PromptScore("few-shot" if few_shot else "zero-shot", len(scores), k / len(scores), lo, hi,
                       tuple(answers))
