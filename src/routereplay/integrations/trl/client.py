"""TRL's vLLM client, keeping what its `generate()` drops: each choice's routes.

`VLLMClient.generate()` posts `/v1/completions` and returns only token ids and
log-probs; vLLM's `routed_experts` (per choice, base64 `.npy`) are thrown away with
the rest of the body. `RoutedVLLMClient` is the same client (TRL's request, retries,
session and weight-sync group) that also keeps the last completions exchange, which
`take_rollouts()` decodes with routereplay's vLLM decoder.
"""

from __future__ import annotations

from typing import Any

from trl.generation.vllm_client import VLLMClient

from routereplay.engines import vllm
from routereplay.errors import SetupError
from routereplay.layout import MoELayout
from routereplay.rollout import Rollout

COMPLETIONS = "/v1/completions"


class RoutedVLLMClient(VLLMClient):
    """A `VLLMClient` whose completions keep their routes (see the module doc)."""

    _exchange: tuple[dict[str, Any], dict[str, Any]] | None = None

    @classmethod
    def adopt(cls, client: VLLMClient) -> RoutedVLLMClient:
        """This client over `client`'s session, server and weight-sync group: TRL
        builds its client (and joins the NCCL group) inside GRPOTrainer.__init__."""
        routed = cls.__new__(cls)
        routed.__dict__.update(vars(client))
        routed._exchange = None
        return routed

    def _post(self, url: str, **kwargs: Any) -> dict[str, Any]:
        body: dict[str, Any] = super()._post(url, **kwargs)
        if url.endswith(COMPLETIONS) and "prompt_logprobs" not in kwargs.get("json", {}):
            self._exchange = (kwargs["json"], body)
        return body

    def take_rollouts(self, layout: MoELayout) -> list[Rollout]:
        """One `Rollout` per choice of the last `generate()` (`index = prompt * n +
        sample`, TRL's order), decoded from the exchange, which is then dropped."""
        if self._exchange is None:
            raise SetupError(
                f"No {COMPLETIONS} response was kept since the last take_rollouts(): "
                "router_replay='R3' decodes the routes of TRL's text-prompt generation "
                "(multimodal prompts go to /inference/v1/generate, which R3 does not read)."
            )
        request, response = self._exchange
        self._exchange = None
        return vllm.from_response(response, layout, request=request, where=self.base_url)
