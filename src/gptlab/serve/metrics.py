"""The counters behind ``GET /metrics``, in Prometheus' text format."""

from __future__ import annotations

from ..batcher import Batcher

__all__ = ["Metrics"]


class Metrics:
    """Updated on the event loop's thread only, so plain integers need no lock."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.seconds_sum = 0.0
        self.seconds_count = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.in_flight = 0  # generation requests running or waiting for the model
        self.rejected = 0

    def text(self, batcher: Batcher | None) -> str:
        """The exposition; ``batcher`` (None while the model loads) adds the batch's gauges."""
        lines = ["# HELP gptlab_requests_total HTTP requests by path and status.",
                 "# TYPE gptlab_requests_total counter"]
        lines += [f'gptlab_requests_total{{path="{path}",status="{status}"}} {n}'
                  for (path, status), n in sorted(self.requests.items())]
        lines += ["# HELP gptlab_request_seconds Time from request to the last byte of the response.",
                  "# TYPE gptlab_request_seconds summary",
                  f"gptlab_request_seconds_sum {self.seconds_sum:.6f}",
                  f"gptlab_request_seconds_count {self.seconds_count}",
                  "# HELP gptlab_tokens_total Tokens in prompts and generated completions.",
                  "# TYPE gptlab_tokens_total counter",
                  f'gptlab_tokens_total{{kind="prompt"}} {self.prompt_tokens}',
                  f'gptlab_tokens_total{{kind="completion"}} {self.completion_tokens}',
                  "# HELP gptlab_queue_depth Generation requests running or waiting for the model.",
                  "# TYPE gptlab_queue_depth gauge", f"gptlab_queue_depth {self.in_flight}",
                  "# HELP gptlab_rejected_total Generation requests refused with 429 (queue full).",
                  "# TYPE gptlab_rejected_total counter", f"gptlab_rejected_total {self.rejected}"]
        if batcher is not None:
            lines += ["# HELP gptlab_batch_sequences Sequences decoding in the batch now, and waiting to join it.",
                      "# TYPE gptlab_batch_sequences gauge",
                      f'gptlab_batch_sequences{{state="running"}} {batcher.running}',
                      f'gptlab_batch_sequences{{state="waiting"}} {batcher.queued}',
                      "# HELP gptlab_decode_steps_total Batched decode steps run.",
                      "# TYPE gptlab_decode_steps_total counter", f"gptlab_decode_steps_total {batcher.steps}"]
        return "\n".join(lines) + "\n"
