"""The OpenAI API on a decoder: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

``model`` picks what answers: an expert's name runs that expert (with its soft prompt), the base
model's id runs the dense model; anything else is a 404. Generations of every expert share the
continuous-batching engine (``doe.engine``). Chat on the base model renders the messages with
the tokenizer's chat template (``role: content`` lines where it has none); an expert of a
generation task answers the last user message laid out as the expert was tuned (its
instruction and chat turn), and an expert of a classification task answers it with the label
its head picks (``finish_reason`` "stop"). Streams are server-sent events in OpenAI's chunk
format, ending with ``data: [DONE]``; an error after the first byte is a ``data: {"error":
...}`` event. Errors are ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from doe.generation import GenerateParams
from doe.requests import Request as RuntimeRequest
from doe.serve.batcher import Job
from doe.serve.openai_schemas import MAX_STOPS, ChatRequest, CompletionRequest, unsupported
from doe.serve.schemas import MIN_TEMPERATURE, ApiError
from doe.serve.state import DISCONNECTED, ServerState, await_answers, disconnected, failed
from doe.serve.streams import DONE, GenerationStream, start_generations

__all__ = ["add_openai", "chat_prompt"]


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The text of ``messages`` for the model to continue as the assistant: the tokenizer's chat
    template, or ``role: content`` lines and ``assistant:`` where it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def add_openai(app: FastAPI, server: ServerState) -> None:
    config = server.config

    @app.get("/v1/models", summary="The base model and every resident expert (OpenAI)")
    async def list_models():
        base = {"id": server.model_id, "object": "model", "created": server.created.get(server.model_id, 0),
                "owned_by": "doe", "parent": None, "root": server.model_id}
        experts = [{"id": task, "object": "model", "created": server.created.get(task, 0), "owned_by": "doe",
                    "parent": server.model_id, "root": server.model_id,
                    "task_type": server.runtime._entries[task].spec.task_type}
                   for task in server.tasks if task not in server.removing]
        return {"object": "list", "data": [base, *experts]}

    def resolve(model: str) -> Optional[str]:
        """The task of ``model`` (None: the base model); 404 for anything else."""
        if server.kind != "decoder" or server.engine is None:
            raise ApiError(404, "model_not_found", f"this server's model is {server.kind} "
                           f"({server.model_type or '?'}); the OpenAI API needs a decoder LM", param="model")
        if model == server.model_id:
            return None
        if model in server.experts and model not in server.removing:
            return model
        raise ApiError(404, "model_not_found", f"The model `{model}` does not exist; this server serves "
                       f"{[server.model_id, *server.tasks]}", param="model")

    def settings(body, max_tokens: Optional[int], default_max: int, choices: int) -> tuple[dict, tuple]:
        name = unsupported(body)
        if name == "temperature":
            raise ApiError(400, "invalid_value", f"temperature: expected 0 (greedy) or at least {MIN_TEMPERATURE}, "
                           f"got {body.temperature!r}", param="temperature")
        if name is not None:
            raise ApiError(400, "unsupported_parameter", f"{name}: this server does not support "
                           f"{getattr(body, name)!r}", param=name)
        max_tokens = default_max if max_tokens is None else max_tokens
        if max_tokens > config.max_new_tokens:
            raise ApiError(400, "invalid_value", f"max_tokens: expected at most {config.max_new_tokens} "
                           f"(--max-new-tokens), got {max_tokens}", param="max_tokens")
        if choices > config.max_items:
            raise ApiError(400, "invalid_value", f"n x prompts = {choices}; this server makes at most "
                           f"{config.max_items} choices per request (--max-items)", param="n")
        stop = () if body.stop is None else (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
        if len(stop) > MAX_STOPS or not all(stop):
            raise ApiError(400, "invalid_value", f"stop: expected up to {MAX_STOPS} non-empty strings, got "
                           f"{list(stop)}", param="stop")
        temperature = 1.0 if body.temperature is None else body.temperature
        return dict(max_new_tokens=max_tokens, temperature=temperature,
                    top_p=1.0 if body.top_p is None else body.top_p, stop=stop), (body.seed,)

    def check_length(task: Optional[str], ids: list, max_tokens: int, chat: bool) -> None:
        soft = 0 if task is None else int(server.runtime._entries[task].on_expert.prompt.shape[0])
        limit = server.engine.max_positions
        if limit is not None and soft + len(ids) + max_tokens > limit:
            raise ApiError(400, "context_length_exceeded", f"This model's maximum context length is {limit} tokens; "
                           f"the prompt has {soft + len(ids)} and max_tokens asks {max_tokens} more",
                           param="messages" if chat else "prompt")
        if not ids and task is None:
            raise ApiError(400, "invalid_value", "the prompt has no tokens", param="messages" if chat else "prompt")

    async def classify_answer(request: Request, task: str, text: str) -> Optional[tuple[str, int]]:
        """(label, prompt tokens) of a classification expert, or None when the client left."""
        tokens = server.count_tokens([text], [None])[0]
        job = Job(asyncio.get_running_loop(), request=RuntimeRequest(text, None, task), key=server.batcher.key_of(task),
                  tokens=tokens)
        server.submit([job])
        answers = await await_answers(server, request, [job])
        if answers is None:
            return None
        failed(answers)
        return answers[0].label, tokens

    async def answer(request: Request, body, chat: bool, prompts: list[Union[str, list]], task: Optional[str]):
        kind = "chat.completion" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        n = body.n
        max_tokens = body.max_completion_tokens if chat and body.max_completion_tokens else body.max_tokens
        options, (seed,) = settings(body, max_tokens, config.max_new_tokens if chat else min(16, config.max_new_tokens),
                                    n * len(prompts))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "invalid_value", "stream_options: only allowed with stream true", param="stream_options")
        spec = None if task is None else server.runtime._entries[task].spec
        if spec is not None and not spec.is_generation:  # a classification expert answers with its label
            labels = []
            for text in prompts:
                got = await classify_answer(request, task, text)
                if got is None:
                    return Response(status_code=DISCONNECTED)
                labels.append(got)
            finals = [(label, "stop", tokens, len(server.loop_tokenizer(label, add_special_tokens=False)["input_ids"]))
                      for label, tokens in labels for _ in range(n)]
            return _respond(body, chat, kind, rid, created, finals, include_usage)
        requests = []
        for p in prompts:
            ids = server.loop_tokenizer(p, add_special_tokens=not chat)["input_ids"] if task is None else None
            check_length(task, ids if ids is not None else server.loop_tokenizer(p)["input_ids"],
                         options["max_new_tokens"], chat)
            for i in range(n):
                params = GenerateParams(p, seed=None if seed is None else seed + i, **options)
                requests.append((params, task, ids))
        streams = start_generations(server, requests)
        if body.stream:
            return StreamingResponse(_stream(request, streams, chat, kind, rid, created, body.model, include_usage, n),
                                     media_type="text/event-stream")
        gone = asyncio.ensure_future(disconnected(request))
        everything = asyncio.gather(*[asyncio.shield(s.done) for s in streams])
        try:
            await asyncio.wait({everything, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server stops waiting: so does the engine
            for s in streams:
                s.cancel()
            raise
        finally:
            gone.cancel()
            everything.cancel()
        if not all(s.done.done() for s in streams):
            for s in streams:
                s.cancel()
            server.metrics.errors.labels(kind="disconnected").inc()
            return Response(status_code=DISCONNECTED)
        handles = [s.done.result() for s in streams]
        errors = sorted({h.error for h in handles if h.error})
        if errors:  # a prompt that does not fit is the client's; anything else the server's
            client = all(e.startswith("context_length_exceeded") for e in errors)
            raise ApiError(400 if client else 500, "context_length_exceeded" if client else "inference_error",
                           "; ".join(errors), param="messages" if chat else "prompt")
        finals = [(h.text, h.finish_reason, h.prompt_tokens, len(h.token_ids)) for h in handles]
        return _respond(body, chat, kind, rid, created, finals, include_usage)

    def _respond(body, chat, kind, rid, created, finals, include_usage):
        """The whole answer: one JSON body, or (a classification expert streaming) its chunks."""
        if body.stream:
            async def chunks():
                for i, (text, reason, _, _) in enumerate(finals):
                    yield _chunk(chat, kind, rid, created, body.model, i, text, None, include_usage, first=True)
                    yield _chunk(chat, kind, rid, created, body.model, i, None, reason, include_usage, first=False)
                if include_usage:
                    yield _usage_chunk(chat, rid, created, body.model, finals, body.n)
                yield "data: [DONE]\n\n"
            return StreamingResponse(chunks(), media_type="text/event-stream")
        choices = []
        for i, (text, reason, _, _) in enumerate(finals):
            choice = {"index": i, "logprobs": None, "finish_reason": reason}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            choices.append(choice)
        prompt = sum(f[2] for f in finals[:: max(1, body.n)])
        return {"id": rid, "object": kind, "created": created, "model": body.model, "choices": choices,
                "usage": _usage(prompt, sum(f[3] for f in finals)), "system_fingerprint": server.fingerprint}

    async def _stream(request: Request, streams: list[GenerationStream], chat, kind, rid, created, model,
                      include_usage, n):
        gone = asyncio.ensure_future(disconnected(request))
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, s: GenerationStream):
            while True:
                piece = await s.pieces.get()
                await queue.put((i, piece))
                if isinstance(piece, tuple) and piece[0] is DONE:
                    return

        pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        started, left, error = set(), len(streams), None
        try:
            while left:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return
                i, piece = getter.result()
                if isinstance(piece, tuple):
                    left -= 1
                    h = piece[1]
                    if h.error is not None:
                        error = h.error
                        break
                    yield _chunk(chat, kind, rid, created, model, i, None, h.finish_reason, include_usage,
                                 first=i not in started)
                else:
                    yield _chunk(chat, kind, rid, created, model, i, piece, None, include_usage,
                                 first=i not in started)
                started.add(i)
            if error is not None:
                server.metrics.errors.labels(kind="inference_error").inc()
                body = {"error": {"message": error, "type": "server_error", "param": None, "code": "inference_error"}}
                yield f"data: {json.dumps(body)}\n\n"
            elif include_usage:
                handles = [s.done.result() for s in streams]
                finals = [(h.text, h.finish_reason, h.prompt_tokens, len(h.token_ids)) for h in handles]
                yield _usage_chunk(chat, rid, created, model, finals, n)
            yield "data: [DONE]\n\n"
        finally:
            gone.cancel()
            for p in pumps:
                p.cancel()
            if not all(s.done.done() for s in streams):  # the client went away: stop generating
                for s in streams:
                    s.cancel()
                server.metrics.errors.labels(kind="disconnected").inc()

    @app.post("/v1/completions", summary="Text completion (OpenAI)")
    async def completions(request: Request, body: CompletionRequest):
        task = resolve(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise ApiError(400, "invalid_value", "prompt: expected a string or a non-empty list of strings, got []",
                           param="prompt")
        return await answer(request, body, False, prompts, task)

    @app.post("/v1/chat/completions", summary="Chat completion (OpenAI)")
    async def chat_completions(request: Request, body: ChatRequest):
        task = resolve(body.model)
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        if task is None:
            try:
                prompt = chat_prompt(server.loop_tokenizer, messages)
            except Exception as exc:  # the template refuses these messages (e.g. roles that do not alternate)
                raise ApiError(400, "invalid_value", f"messages: the chat template refused them: {exc}",
                               param="messages") from exc
        else:
            users = [m["content"] for m in messages if m["role"] == "user"]
            if not users:
                raise ApiError(400, "invalid_value", "messages: an expert answers the last user message; none "
                               "was given", param="messages")
            prompt = users[-1]
        return await answer(request, body, True, [prompt], task)


def _chunk(chat: bool, kind: str, rid: str, created: int, model: str, index: int, piece: Optional[str],
           reason: Optional[str], include_usage: bool, first: bool) -> str:
    if chat:
        delta = {} if piece is None else {"content": piece}
        if first:
            delta = {"role": "assistant", **({"content": ""} if piece is None and reason is None else delta)}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    else:
        choice = {"index": index, "text": piece or "", "logprobs": None, "finish_reason": reason}
        body = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
    if include_usage:
        body["usage"] = None
    return f"data: {json.dumps(body)}\n\n"


def _usage_chunk(chat: bool, rid: str, created: int, model: str, finals: list, n: int) -> str:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage
    (``finals``: (text, reason, prompt tokens, completion tokens) per choice, n per prompt)."""
    prompt = sum(f[2] for f in finals[:: max(1, n)])
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": _usage(prompt, sum(f[3] for f in finals))}
    return f"data: {json.dumps(body)}\n\n"
