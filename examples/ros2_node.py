"""A ROS 2 node that answers questions with an edgekit bundle.

    ros2 run ... / python3 examples/ros2_node.py --ros-args -p bundle:=/home/robot/edgekit/current

Topics (relative names: put the node in a namespace or remap them):
    prompt          std_msgs/String in   a question
    answer          std_msgs/String out  the answer, one message per question, in the order asked; "busy: ..."
                                         when the queue is full, "error: ..." when the question cannot be answered
    answer_partial  std_msgs/String out  the answer's text deltas while it is generated (stream_partial)
    reasoning       std_msgs/String out  R1's thought, one message per question, just before its answer
                                         (publish_reasoning; nothing for models that do not reason)
Parameters: bundle (required), memory_budget ("3.5GiB", "" = what the device has free), max_context (0 = the
bundle's), max_new_tokens, thinking_budget (-1 = none), temperature (-1.0 = the bundle's; a double: write 0.0, as
ROS refuses an integer for it), queue_size (questions
waiting behind the running one; 0 = answer "busy" while one runs), stream_partial, publish_reasoning.

Why a worker thread and not ``Model.astream``: rclpy's executor (ROS 2 Humble, the JetPack 6 ROS) is not asyncio:
its callbacks run on the executor's own thread and its coroutine support cannot await asyncio futures. A
generation takes seconds, so it cannot run inside the subscription callback (the executor would stop
delivering messages and handling shutdown). The callback only queues the question; one worker thread runs
``Model.stream`` (blocking, with a cancel event) and publishes from there. An asyncio program (Home Assistant,
examples/asyncio_chat.py) uses ``Model.astream`` instead.

The logic lives in :class:`AnswerCore`, which imports no ROS package: rclpy is not on PyPI (it comes from the ROS
apt packages), so tests/test_examples_ros2.py runs the core with a real bundle and a fake publisher; only
``main`` imports rclpy.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable

Publish = Callable[[str], None]
BUSY_REPLY = "busy: one question at a time and the queue is full; ask again when this answer arrives"
_STOP = object()  # the worker's last item


class AnswerCore:
    """Questions in, answers out, one generation at a time; no ROS import.

    ``publish_answer`` (and the optional ``publish_partial`` / ``publish_reasoning``) are called with text: from
    the worker thread, and ``publish_answer`` also from ``submit``'s caller for a "busy" reply. Calls never
    overlap (one lock), so a publisher that is not thread-safe is fine. ``generation`` holds ``Model.stream``
    keywords (max_new_tokens, thinking_budget, temperature, seed ...), checked here, once."""

    def __init__(self, model, publish_answer: Publish, *, publish_partial: Publish | None = None,
                 publish_reasoning: Publish | None = None, queue_size: int = 4, busy_reply: str = BUSY_REPLY,
                 log: Callable[[str], None] | None = None, **generation):
        if not isinstance(queue_size, int) or queue_size < 0:
            raise ValueError(f"invalid queue_size {queue_size!r}: use a whole number >= 0 (0: reply busy)")
        model.request("check", **generation)   # a bad option fails now (GenerationError), not at every question
        self.model = model
        self.generation = generation
        self.queue_size = queue_size
        self.busy_reply = busy_reply
        self._publish_answer, self._publish_partial, self._publish_reasoning = \
            publish_answer, publish_partial, publish_reasoning
        self._log = log or (lambda line: None)
        self._publish_lock = threading.Lock()
        self._state = threading.Lock()        # guards _pending and _closed between submit() and the worker
        self._pending = 0                      # the running question + the waiting ones
        self._closed = False
        self._cancel = threading.Event()       # set once, by shutdown(): the running generation stops
        self._questions: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="edgekit-ros2-answers")
        self._worker.start()

    # ----- called from the subscription callback: never blocks on a generation ----------------------------
    def submit(self, prompt: str) -> bool:
        """Queue a question. False (and a "busy" reply) when the queue is full; False after shutdown()."""
        with self._state:
            if self._closed:
                return False
            accepted = self._pending < 1 + self.queue_size
            if accepted:
                self._pending += 1
                self._questions.put(prompt)
        if not accepted:
            self._publish(self._publish_answer, self.busy_reply)
        return accepted

    @property
    def pending(self) -> int:
        """Questions not answered yet (the running one included)."""
        return self._pending

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop: cancel the running generation (it stops at the next token, its answer is not published), drop
        the waiting questions, and wait for the worker thread. True if it has ended."""
        with self._state:
            self._closed = True
            self._cancel.set()
            dropped = 0
            while True:
                try:
                    self._questions.get_nowait()
                    dropped += 1
                except queue.Empty:
                    break
            self._pending -= dropped
            self._questions.put(_STOP)
        if dropped:
            self._log(f"shutdown: {dropped} waiting question(s) dropped")
        self._worker.join(timeout)
        return not self._worker.is_alive()

    # ----- the worker thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            prompt = self._questions.get()
            if prompt is _STOP:
                return
            try:
                self._answer(prompt)
            finally:
                with self._state:
                    self._pending -= 1

    def _answer(self, prompt: str) -> None:
        result = None
        try:
            for event in self.model.stream(messages=self.model.chat_prompt(prompt), cancel=self._cancel,
                                           **self.generation):
                if event.kind == "answer" and self._publish_partial is not None:
                    self._publish(self._publish_partial, event.text)
                elif event.kind == "done":
                    result = event.result
        except Exception as e:  # a question that cannot be answered (too long for max_context ...): say so
            self._log(f"question not answered: {e}")
            self._publish(self._publish_answer, f"error: {e}")
            return
        if result is None or result.finish_reason == "cancelled":   # shutting down: nobody waits for it
            return
        if self._publish_reasoning is not None and result.reasoning:
            self._publish(self._publish_reasoning, result.reasoning)
        self._publish(self._publish_answer, result.answer)
        self._log(f"answered: {result.completion_tokens} tokens, {result.decode_tok_s:.1f} tok/s, "
                  f"finish {result.finish_reason}")

    def _publish(self, publish: Publish, text: str) -> None:
        # A publisher can fail while ROS shuts down (the context is gone before shutdown() ran): log it and go
        # on, the worker must stay alive to be stopped and joined.
        try:
            with self._publish_lock:
                publish(text)
        except Exception as e:
            self._log(f"publish failed: {e}")


# ----- ROS 2 (rclpy comes from the ROS apt packages, not PyPI; imported only here) ---------------------------
def main(argv: list[str] | None = None) -> int:
    import rclpy
    from rclpy.exceptions import InvalidParameterTypeException
    from rclpy.executors import ExternalShutdownException
    from rclpy.node import Node
    from std_msgs.msg import String

    from edgekit.errors import EdgekitError
    from edgekit.runtime.model import load

    class EdgekitAnswerNode(Node):
        def __init__(self):
            super().__init__("edgekit")
            def param(name, default):
                return self.declare_parameter(name, default).value
            bundle = param("bundle", "")
            if not bundle:
                raise EdgekitError("no bundle: run with --ros-args -p bundle:=/path/to/bundle "
                                   "(the folder edgekit flash made current, e.g. /home/robot/edgekit/current)")
            budget, context = param("memory_budget", ""), param("max_context", 0)
            generation = {"max_new_tokens": param("max_new_tokens", 256)}
            thinking_budget, temperature = param("thinking_budget", -1), param("temperature", -1.0)
            if thinking_budget >= 0:
                generation["thinking_budget"] = thinking_budget
            if temperature >= 0:
                generation["temperature"] = temperature
            self.model = load(bundle, memory_budget=budget or None, max_context=context or None)

            def publisher(topic):
                pub = self.create_publisher(String, topic, 10)
                return lambda text: pub.publish(String(data=text))
            log = self.get_logger()
            self.core = AnswerCore(
                self.model, publisher("answer"),
                publish_partial=publisher("answer_partial") if param("stream_partial", True) else None,
                publish_reasoning=publisher("reasoning") if param("publish_reasoning", True) else None,
                queue_size=param("queue_size", 4), log=log.info, **generation)
            self.create_subscription(String, "prompt", lambda msg: self.core.submit(msg.data), 10)
            log.info(f"edgekit: {bundle} loaded ({self.model.max_context} tokens of context); "
                     "listening on 'prompt'")

        def close(self):
            self.core.shutdown()   # before the node goes: the worker publishes through it
            self.model.close()
            self.destroy_node()

    rclpy.init(args=argv)
    node = None
    try:
        node = EdgekitAnswerNode()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (EdgekitError, ValueError, InvalidParameterTypeException) as e:  # bad parameter/bundle/budget: one line
        print(f"edgekit ros2 node: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    finally:
        if node is not None:
            node.close()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
