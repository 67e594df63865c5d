"""The `generate` model inside Triton's python backend: parse each request, hand it to the
scheduler, stream tokens through the request's response sender, publish the toolkit's metrics.

`pb_utils` (triton_python_backend_utils) exists only inside the backend's stub process, so it is
passed in rather than imported.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import numpy as np

from models.errors import ToolkitError

from ..decoding.text import TextPieces
from ..registry import backend_on
from .limits import Limits
from .metrics import OUTCOMES, ServingMetrics
from .requests import RequestError, parse_cancel, parse_request
from .responder import SENDERS
from .scheduler import Scheduler

DRAIN_S = 30.0  # at unload, how long active requests may still run (Triton drains before unloading)
# toolkit metric -> (Prometheus name, kind, help)
METRICS = {
    "tokens": ("rotary_generate_tokens_total", "COUNTER", "tokens generated"),
    "tokens_per_second": ("rotary_generate_tokens_per_second", "GAUGE", "tokens generated per second, last 5 s"),
    "steps": ("rotary_generate_steps_total", "COUNTER", "decode steps"),
    "step_rows": ("rotary_generate_step_rows_total", "COUNTER", "rows decoded, summed over steps (/ steps: mean batch)"),
    "step_seconds": ("rotary_generate_step_seconds_total", "COUNTER",
                     "decode loop time per step, each from the step before's return: the step with its "
                     "sampling and the loop's work between steps (/ steps: mean step time)"),
    "admit_steps": ("rotary_generate_admit_steps_total", "COUNTER",
                    "decode steps that also admitted requests and prefilled their prompts"),
    "admit_step_seconds": ("rotary_generate_admit_step_seconds_total", "COUNTER",
                           "time in those steps (the rest of step_seconds: steps that only decoded)"),
    "send_seconds": ("rotary_generate_send_seconds_total", "COUNTER",
                     "time spent handing responses to the server (the responder thread)"),
    "active_rows": ("rotary_generate_active_rows", "GAUGE", "requests being decoded"),
    "queue_length": ("rotary_generate_queue_length", "GAUGE", "requests waiting for a free row"),
    "open_streams": ("rotary_generate_open_streams", "GAUGE", "requests not yet sent their final response"),
    "unloading": ("rotary_generate_unloading", "GAUGE",
                  "1 once Triton finalizes the instance (after every stream to it has ended)"),
    "requests": ("rotary_generate_requests_total", "COUNTER", "finished requests by outcome"),
}


class TritonStream:
    """One request's response sender, as the scheduler's Stream. Triton frees a request's response
    factory once its final response is sent, and asking a freed one whether it was cancelled
    crashes the server: the lock keeps the watcher's question and the senders' last send apart."""

    def __init__(self, pb_utils, sender, text: bool, text_name: str = "text", stream: bool = True,
                 on_final=lambda: None):
        """`text`: send each response's text as `text_name`; `stream` False: hold every token for
        one final response (a generate-extension client asking for the whole answer);
        `on_final()` is called once, when the request is completed."""
        self.pb, self.sender = pb_utils, sender
        self.pieces = TextPieces() if text else None
        self.text_name, self.stream = text_name, stream
        self.on_final = on_final
        self.held: list[int] = []
        self._lock = threading.Lock()
        self._open = True

    def send(self, tokens: list[int], final: bool) -> bool:
        """One response with the stream's pending tokens (and their text, for a text prompt)."""
        if not self.stream:
            self.held.extend(tokens)
            if not final:
                return True
            tokens, self.held = self.held, []
        outputs = [self.pb.Tensor("token_id", np.array(tokens, dtype=np.int64))]
        if self.pieces:  # a string tensor costs more to send: only for text prompts
            last = len(tokens) - 1
            text = "".join(self.pieces.piece(token, final and i == last) for i, token in enumerate(tokens))
            outputs.append(self.pb.Tensor(self.text_name, np.array([text.encode("utf-8")], dtype=np.object_)))
        return self._send(self.pb.InferenceResponse(output_tensors=outputs), final)

    def fail(self, message: str) -> bool:
        return self._send(self.pb.InferenceResponse(error=self.pb.TritonError(message)), True)

    def end(self) -> bool:
        """The request is over before its last token (cancelled): a streamed one gets a final flag
        with no response; a non-streamed one still gets its one response, with the tokens held."""
        if not self.stream:
            return self.send([], True)
        return self._send(None, True)

    def cancelled(self) -> bool:
        with self._lock:  # never ask a sender whose final response has gone: its factory is freed
            return not self._open or self.sender.is_cancelled()

    def _send(self, response, final: bool) -> bool:
        flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        with self._lock:
            if not self._open:
                return False
            try:
                if response is None:
                    self.sender.send(flags=flags)
                else:
                    self.sender.send(response, flags=flags)
            except Exception:
                if final:  # the request stays live, and `generate` cannot unload, until it is completed
                    self._complete_anyway(response is not None)
                raise
            if final:
                self._close()
        return True

    def _close(self) -> None:
        self._open = False
        self.on_final()

    def _complete_anyway(self, with_response: bool) -> None:
        """A final response was refused (its client cancelled): complete the request with the bare
        final flag, or else by asking about cancellation (which completes a cancelled request)."""
        self._close()
        try:
            if with_response:
                self.sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
        except Exception:
            pass
        try:
            self.sender.is_cancelled()
        except Exception:
            pass


class TritonMetricsSink:
    """The toolkit's metrics as Triton custom metrics (on the server's /metrics). The families are
    kept referenced: a collected family invalidates its metrics."""

    def __init__(self, pb_utils, labels: dict[str, str]):
        kinds = {"COUNTER": pb_utils.MetricFamily.COUNTER, "GAUGE": pb_utils.MetricFamily.GAUGE}
        self.families = {key: pb_utils.MetricFamily(name=name, description=text, kind=kinds[kind])
                         for key, (name, kind, text) in METRICS.items()}
        self.counters = {key for key, (_, kind, _) in METRICS.items() if kind == "COUNTER"}
        self.metrics = {key: family.Metric(labels=labels) for key, family in self.families.items() if key != "requests"}
        self.metrics.update({("requests", outcome): self.families["requests"].Metric(labels={**labels, "outcome": outcome})
                             for outcome in OUTCOMES})

    def publish(self, name: str, value: float, outcome: str | None = None) -> None:
        metric = self.metrics[(name, outcome) if outcome else name]
        if name in self.counters:
            metric.increment(value)
        else:
            metric.set(value)


def _versions() -> str:
    """What the stub imported: a numpy 2 here, or a CPU-only onnxruntime, is the usual surprise."""
    import onnxruntime
    import torch

    return (f"python {sys.version.split()[0]}, numpy {np.__version__} ({Path(np.__file__).parent}), onnxruntime "
            f"{onnxruntime.__version__} "
            f"{onnxruntime.get_available_providers()}, torch {torch.__version__} (CUDA "
            f"{'available' if torch.cuda.is_available() else 'not available'})")


class GenerateModel:
    def __init__(self, pb_utils, args: dict):
        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        self.limits = Limits.from_parameters(params)
        model = (Path(args["model_repository"]) / params.get("decoder_model", "")).resolve()
        spec = backend_on(params.get("device", "auto"), model)
        gpu = int(args["model_instance_device_id"]) if args.get("model_instance_kind") == "GPU" else None
        labels = {"model": config.get("name", "generate"), "instance": args.get("model_instance_name", "")}
        sink = TritonMetricsSink(pb_utils, {**labels, **({"gpu": str(gpu)} if gpu is not None else {})})
        self.metrics = ServingMetrics(sink)
        senders = int(os.environ.get("ROTARY_SERVE_SENDERS", SENDERS))  # tuning: threads sending responses
        self.scheduler = Scheduler.in_process(model, spec.name, self.limits, python=os.environ.get("ROTARY_SERVE_PYTHON"),
                                              gpu=gpu, metrics=self.metrics, log=pb_utils.Logger.log_warn,
                                              senders=max(1, senders))
        self.facts = self.scheduler.facts
        try:
            self.limits.check_capacity(self.facts["max_length"], self.facts["capacity_hint"])
        except ToolkitError:
            self.scheduler.close(0.0)
            self.metrics.close()
            raise
        self.scheduler.start()
        where = f" on GPU {gpu}" if gpu is not None else ""
        pb_utils.Logger.log_info(f"generate: {self.facts['name']} ({self.facts['mode']}) over {model.name}, "
                                 f"{self.limits.max_rows} rows, decoding in process {self.scheduler.pid}{where}; "
                                 f"{_versions()}")

    def submit(self, request) -> None:
        """Check the request and queue it; a bad request gets one error response, nothing else."""
        sender = request.get_response_sender()
        self.metrics.stream_opened()  # until its final response: serve's stop tells a held model by these
        arrays = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
        try:
            key = parse_cancel(arrays)
            if key is not None:  # a cancel request: it ends at once, the request it names soon after
                self.scheduler.cancel_key(key)  # an empty final response (Triton's generate endpoint needs one)
                TritonStream(self.pb, sender, False, on_final=self.metrics.stream_closed).send([], final=True)
                return
            parsed = parse_request(arrays, self.facts["vocab_size"], self.limits, self.facts["max_length"])
        except RequestError as error:
            self.metrics.finished("rejected")
            TritonStream(self.pb, sender, False, on_final=self.metrics.stream_closed).fail(str(error))
            return
        self.scheduler.submit(parsed, TritonStream(self.pb, sender, parsed.text,
                                                   "text_output" if parsed.text_output else "text", parsed.stream,
                                                   on_final=self.metrics.stream_closed))

    def close(self) -> None:
        self.metrics.begin_unloading()
        self.scheduler.close(DRAIN_S)
        self.metrics.close()
