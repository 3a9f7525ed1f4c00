"""A stand-in for `vllm serve --enable-return-routed-experts`, without a GPU: an
OpenAI-compatible HTTP server over `engines.hf.RecordingEngine` that answers
`/v1/completions` in vLLM 0.32's wire format (see `engines.vllm.encode`), routes and
all. It is for developing and testing R3 pipelines (TRL's server mode, a home-grown
loop) on a laptop or CI; it is not an inference server.

Endpoints: `GET /health`, `GET /v1/models`, `GET /server_info` (what TRL's client
reads), `POST /v1/completions` (token-id or, with a tokenizer, text prompts; `n`,
`max_tokens`, `temperature`, `top_p`, `seed`, `logprobs: 0`, `stop_token_ids`,
`ignore_eos`, `return_token_ids`, `return_tokens_as_token_ids`,
`routed_experts_prompt_start`), `POST /reset_prefix_cache`. Anything else a request
asks for that the engine cannot do is a 400 naming the field, never ignored.

Weights: vLLM's NCCL weight transfer has no CPU path, so a trainer in the same
process hands weights over with `update_weights(named_tensors)`.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from routereplay.engines.hf import RecordingEngine, SamplingParams
from routereplay.engines.vllm.encode import completion_choice, completions_body
from routereplay.errors import RouteReplayError
from routereplay.layout import MoELayout
from routereplay.rollout import Rollout

# Sampling fields the engine does not implement, with the value that means "off".
_NEUTRAL = {"top_k": (0, -1), "min_p": (0, 0.0), "repetition_penalty": (1, 1.0)}
_IGNORED = {"model", "return_token_ids", "return_tokens_as_token_ids", "output_kind"}
_HANDLED = {
    "prompt",
    "n",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "logprobs",
    "stop_token_ids",
    "ignore_eos",
    "routed_experts_prompt_start",
    "stream",
}


class BadRequest(ValueError):
    """A request the stand-in refuses (HTTP 400), with the field it cannot serve."""


class CompletionsServer:
    """`engine` behind vLLM's `/v1/completions` on `host:port` (0: any free port)."""

    def __init__(
        self,
        engine: RecordingEngine,
        *,
        model_name: str = "routereplay",
        tokenizer: Any = None,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        return_routed_experts: bool = True,
    ) -> None:
        self.engine = engine
        self.layout: MoELayout = engine.controller.layout
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.return_routed_experts = return_routed_experts
        self.eos_token_ids = _eos_token_ids(engine.model)
        # Requests without a seed still differ from each other, reproducibly.
        self._seeds = random.Random(seed)
        self._lock = threading.Lock()  # one generation or weight update at a time
        self.requests = 0
        self._http = ThreadingHTTPServer((host, port), _handler(self))
        self._http.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """`http://host:port` the server listens on (port 0 picks a free one)."""
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> CompletionsServer:
        """Serve in a background thread; returns self."""
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until `close()` (what `routereplay serve` runs)."""
        self._http.serve_forever()

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join()
            self._thread = None
        self._http.server_close()

    def __enter__(self) -> CompletionsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the trainer's tensors into the engine's model by parameter name (cast to
        the engine's dtype), as vLLM's weight update does."""
        with self._lock, torch.no_grad():
            params = dict(self.engine.model.named_parameters())
            for name, tensor in named_tensors:
                if name not in params:
                    raise BadRequest(f"The served model has no parameter {name!r}.")
                params[name].copy_(tensor)

    # -- requests ---------------------------------------------------------------------

    def completions(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The `/v1/completions` response body to `request`."""
        prompts = self._prompts(request.get("prompt"))
        n = _integer(request, "n", 1, minimum=1)
        params = self._sampling(request)
        start = _integer(request, "routed_experts_prompt_start", 0, minimum=0)
        logprobs = request.get("logprobs")
        if logprobs not in (None, 0):
            raise BadRequest(
                f"logprobs={logprobs!r}: the stand-in returns only the sampled token's "
                "log-prob (logprobs: 0)."
            )
        with self._lock:
            self.requests += 1
            rollouts = self.engine.generate([p for p in prompts for _ in range(n)], params)
        choices = [
            completion_choice(
                rollout,
                self.layout,
                index=index,
                text=self._text(rollout.completion_ids, params),
                stop_reason=self._stop_reason(rollout, params),
                prompt_start=start,
                return_token_ids=bool(request.get("return_token_ids", False)),
                logprobs=logprobs is not None,
                tokens_as_ids=bool(request.get("return_tokens_as_token_ids", False)),
                token_texts=self._token_texts(rollout.completion_ids),
                routed_experts=self.return_routed_experts,
            )
            for index, rollout in enumerate(rollouts)
        ]
        return completions_body(
            choices,
            self.model_name,
            prompt_tokens=sum(len(p) for p in prompts),
            completion_tokens=sum(r.completion_len for r in rollouts),
        )

    def models(self) -> dict[str, Any]:
        """The `/v1/models` body: the one model served."""
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "owned_by": "routereplay"}],
        }

    def server_info(self) -> dict[str, Any]:
        """The `/get_server_info` body TRL's client reads."""
        # The fields TRL's client reads: sampled log-probs are the processed ones (after
        # temperature), and there is no weight-transfer engine.
        return {
            "vllm_config": {
                "model_config": {"logprobs_mode": "processed_logprobs"},
                "weight_transfer_config": None,
            }
        }

    def _prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt)
        ):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("prompt must be token ids, a string, or a non-empty list of them.")
        prompts = []
        for index, one in enumerate(prompt):
            if isinstance(one, str):
                if self.tokenizer is None:
                    raise BadRequest(
                        "prompt is text, but the server has no tokenizer: send token ids, "
                        "or start it with the model's tokenizer."
                    )
                one = self.tokenizer(one, add_special_tokens=False)["input_ids"]
            if not isinstance(one, list) or not one or not all(isinstance(t, int) for t in one):
                raise BadRequest(f"prompt {index} must be a non-empty list of token ids.")
            config: Any = self.engine.model.config
            vocab = int(config.vocab_size)
            if not all(0 <= t < vocab for t in one):
                raise BadRequest(f"prompt {index} holds token ids outside [0, {vocab}).")
            prompts.append(one)
        return prompts

    def _sampling(self, request: Mapping[str, Any]) -> SamplingParams:
        unknown = set(request) - _HANDLED - _IGNORED - set(_NEUTRAL)
        if unknown:
            raise BadRequest(f"The stand-in does not implement {sorted(unknown)}.")
        for name, neutral in _NEUTRAL.items():
            if request.get(name, neutral[0]) not in neutral:
                raise BadRequest(
                    f"{name}={request[name]!r}: the stand-in samples without it (send "
                    f"{neutral[0]!r} or leave it out)."
                )
        if request.get("stream"):
            raise BadRequest("stream: vLLM sends no routes on a completions stream.")
        stops = [int(t) for t in request.get("stop_token_ids") or []]
        if not request.get("ignore_eos", False):
            stops += self.eos_token_ids
        seed = request.get("seed")
        try:
            return SamplingParams(
                max_new_tokens=_integer(request, "max_tokens", 16, minimum=1),
                temperature=float(request.get("temperature", 1.0)),
                top_p=float(request.get("top_p", 1.0)),
                stop_token_ids=tuple(stops),
                seed=self._seeds.randrange(2**31) if seed is None else int(seed),
            )
        except (TypeError, ValueError) as error:
            raise BadRequest(str(error)) from None

    def _stop_reason(self, rollout: Rollout, params: SamplingParams) -> int | None:
        # vLLM names a stop token it was asked for, and None for end-of-sequence.
        last = int(rollout.completion_ids[-1])
        if rollout.finish_reason == "stop" and last not in self.eos_token_ids:
            return last
        return None

    def _text(self, completion: torch.Tensor, params: SamplingParams) -> str:
        if self.tokenizer is None:
            return ""
        ids = completion.tolist()
        if ids and ids[-1] in params.stop_token_ids:
            ids = ids[:-1]  # vLLM's text leaves the stop token out
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _token_texts(self, completion: torch.Tensor) -> Sequence[str] | None:
        if self.tokenizer is None:
            return None
        return [str(t) for t in self.tokenizer.convert_ids_to_tokens(completion.tolist())]


def _eos_token_ids(model: Any) -> list[int]:
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(t) for t in eos]


def _integer(request: Mapping[str, Any], name: str, default: int, *, minimum: int) -> int:
    value = request.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadRequest(f"{name} must be an integer >= {minimum}, found {value!r}.")
    return value


def _handler(server: CompletionsServer) -> type[BaseHTTPRequestHandler]:
    routes_get = {
        "/health": lambda: {},
        "/v1/models": server.models,
        "/server_info": server.server_info,
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name
            answer = routes_get.get(self.path.split("?")[0])
            if answer is None:
                self._error(HTTPStatus.NOT_FOUND, f"No GET {self.path} on this stand-in.")
                return
            self._send(HTTPStatus.OK, answer())

        def do_POST(self) -> None:
            path = self.path.split("?")[0]
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if path == "/reset_prefix_cache":
                self._send(HTTPStatus.OK, {"success": True})  # there is no prefix cache
                return
            if path != "/v1/completions":
                self._error(HTTPStatus.NOT_FOUND, f"No POST {path} on this stand-in.")
                return
            try:
                request = json.loads(raw or b"{}")
                if not isinstance(request, dict):
                    raise BadRequest("The request body must be a JSON object.")
                body = server.completions(request)
            except (BadRequest, RouteReplayError, json.JSONDecodeError) as error:
                self._error(HTTPStatus.BAD_REQUEST, str(error))
                return
            except Exception as error:  # a client must hear of it, not see a dropped socket
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(error).__name__}: {error}")
                raise
            self._send(HTTPStatus.OK, body)

        def _error(self, status: HTTPStatus, message: str) -> None:
            error = {"message": message, "type": status.phrase, "param": None, "code": status}
            self._send(status, {"error": error})

        def _send(self, status: HTTPStatus, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request on stderr would drown a training log

    return Handler
