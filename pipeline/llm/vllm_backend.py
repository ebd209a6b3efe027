"""In-process batch generation with `vllm.LLM` behind the same `run()` as the server backend.

Uses `LLM.chat(list_of_conversations, sampling_params=[...])`; JSON schemas go through
`SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))` (vLLM >= 0.11; older releases:
`guided_decoding=GuidedDecodingParams(json=schema)`), logprobs through `SamplingParams(logprobs=k)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import MprError
from pipeline.llm.base import ChatBackend, RunContext, WorkItem
from pipeline.llm.cache import ResultCache
from pipeline.llm.types import ChatRequest, ChatResult, TokenLogprob

INSTALL_HINT = (
    'in-process vLLM is not installed: pip install "mpr[vllm]" (or point --base-url at a running server)'
)


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise MprError(INSTALL_HINT) from e
    return vllm


class VLLMBackend(ChatBackend):
    kind = "vllm"

    def __init__(
        self,
        model: str,
        *,
        cache: ResultCache | str | Path | None = None,
        max_invalid_retries: int = 2,
        batch_size: int = 2048,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        llm_kwargs: Mapping[str, Any] | None = None,
    ):
        super().__init__(model, cache=cache, max_invalid_retries=max_invalid_retries)
        self._vllm = _import_vllm()
        self.batch_size = batch_size
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.llm_kwargs = dict(llm_kwargs or {})
        self._llm: Any = None

    def __repr__(self) -> str:
        return f"VLLMBackend(model={self.model!r})"

    @property
    def llm(self) -> Any:
        if self._llm is None:
            self._llm = self._vllm.LLM(model=self.model, **self.llm_kwargs)
        return self._llm

    async def _generate(self, todo: list[WorkItem], ctx: RunContext) -> None:
        attempts = dict.fromkeys((it.key for it in todo), 0)
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            for round_no in range(self.max_invalid_retries + 1):
                if not batch:
                    break
                outputs = self._chat([it.request for it in batch])
                ctx.stats.sent += len(batch)
                if round_no:
                    ctx.stats.retries += len(batch)
                again = []
                for item, output in zip(batch, outputs, strict=True):
                    attempts[item.key] += 1
                    result = _result(item.key, output, item.request.top_logprobs)
                    result.attempts = attempts[item.key]
                    problem = ctx.check(item, result)
                    if problem is None:
                        await ctx.finish(item, result)
                        continue
                    ctx.stats.invalid += 1
                    if round_no == self.max_invalid_retries:
                        result.error = f"invalid answer after {result.attempts} attempts: {problem}"
                        result.parsed = None
                        await ctx.finish(item, result)
                    else:
                        again.append(item)
                batch = again

    def _chat(self, requests: list[ChatRequest]) -> list[Any]:
        conversations = [[{"role": m.role, "content": m.content} for m in r.messages] for r in requests]
        params = [self._sampling_params(r) for r in requests]
        kwargs: dict[str, Any] = {"use_tqdm": False}
        if self.chat_template_kwargs:
            kwargs["chat_template_kwargs"] = self.chat_template_kwargs
        return self.llm.chat(conversations, sampling_params=params, **kwargs)

    def _sampling_params(self, r: ChatRequest) -> Any:
        sp = self._vllm.SamplingParams
        # max_tokens=None means "up to the context length" (vLLM's own default would be 16).
        kwargs: dict[str, Any] = {
            "temperature": r.temperature,
            "top_p": r.top_p,
            "seed": r.seed,
            "max_tokens": r.max_tokens,
        }
        if r.stop:
            kwargs["stop"] = r.stop
        if r.logprobs:
            kwargs["logprobs"] = r.top_logprobs
        if r.json_schema is not None:
            try:
                from vllm.sampling_params import StructuredOutputsParams

                kwargs["structured_outputs"] = StructuredOutputsParams(json=r.json_schema)
            except ImportError:
                from vllm.sampling_params import GuidedDecodingParams

                kwargs["guided_decoding"] = GuidedDecodingParams(json=r.json_schema)
        return sp(**kwargs)


def _result(key: str, output: Any, top_n: int) -> ChatResult:
    """A ChatResult from a vllm RequestOutput (first completion).

    vLLM returns, per position, the top-`top_n` tokens plus the sampled one when it ranks lower; like
    OpenAI's `top_logprobs`, `top` keeps only ranks 1..top_n.
    """
    out = output.outputs[0]
    logprobs = None
    if out.logprobs is not None:
        logprobs = []
        for token_id, position in zip(out.token_ids, out.logprobs, strict=False):
            chosen = position.get(token_id)
            ranked = sorted(
                (lp for lp in position.values() if lp.rank is not None and lp.rank <= top_n),
                key=lambda lp: lp.rank,
            )
            logprobs.append(
                TokenLogprob(
                    token=(chosen.decoded_token if chosen is not None else "") or "",
                    logprob=chosen.logprob if chosen is not None else float("-inf"),
                    top=[(lp.decoded_token or "", lp.logprob) for lp in ranked],
                )
            )
    return ChatResult(
        key=key,
        content=out.text,
        finish_reason=out.finish_reason,
        logprobs=logprobs,
        prompt_tokens=len(output.prompt_token_ids or ()),
        completion_tokens=len(out.token_ids),
    )
