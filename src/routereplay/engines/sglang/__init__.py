"""SGLang: routed experts from `/generate` and the OpenAI-compatible endpoints.

    rollouts = sglang.from_response(requests.post(url, json=body).json(), layout, request=body)

`arrays` decodes one sequence's base64 int32 routes (`meta_info.routed_experts`);
`server` finds them and the token ids in each endpoint's response.
"""

from routereplay.engines.sglang.arrays import SOURCE, from_meta_info
from routereplay.engines.sglang.server import from_generate, from_openai_response, from_response

__all__ = ["SOURCE", "from_generate", "from_meta_info", "from_openai_response", "from_response"]
