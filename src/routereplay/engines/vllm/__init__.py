"""vLLM: routed experts from the offline engine and from every server endpoint.

    rollouts = vllm.from_request_outputs(llm.generate(prompts, params), layout)
    rollouts = vllm.from_response(requests.post(url, json=body).json(), layout, request=body)
    rollouts = vllm.from_stream(sse_lines, layout, request=body)

`arrays` decodes one sequence's routed-experts array (numpy, base64 `.npy`, vLLM
0.21's JSON lists); `offline` and `server` find the arrays and token ids in what the
engine returns.
"""

from routereplay.engines.vllm.arrays import SOURCE, from_completion, from_openai_choice
from routereplay.engines.vllm.offline import (
    from_request_output,
    from_request_outputs,
    from_saved_completion,
)
from routereplay.engines.vllm.server import endpoint_of, from_response, from_stream

__all__ = [
    "SOURCE",
    "endpoint_of",
    "from_completion",
    "from_openai_choice",
    "from_request_output",
    "from_request_outputs",
    "from_response",
    "from_saved_completion",
    "from_stream",
]
