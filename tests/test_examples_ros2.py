"""examples/ros2_node.py: the node's logic (AnswerCore, no rclpy: rclpy comes from the ROS apt packages, not
PyPI) with real bundles and a recording publisher; then main() wired to a stand-in of rclpy's Humble API."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from spies import record_results

from edgekit.errors import GenerationError
from edgekit.runtime.model import load

EXAMPLE = Path(__file__).parents[1] / "examples" / "ros2_node.py"
GREEDY = dict(max_new_tokens=24, temperature=0)
LONG = dict(max_new_tokens=600, temperature=0, ignore_eos=True)   # a minute on SmolLM2 if not cancelled


def _example():
    spec = importlib.util.spec_from_file_location("edgekit_example_ros2_node", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ros2 = _example()


class Topics:
    """Records what the core publishes, in order, as (topic, text); waits for answers."""

    def __init__(self):
        self.log: list[tuple[str, str]] = []
        self.lines: list[str] = []
        self._changed = threading.Condition()

    def publisher(self, topic):
        def publish(text):
            assert isinstance(text, str)
            with self._changed:
                self.log.append((topic, text))
                self._changed.notify_all()
        return publish

    def on(self, topic):
        return [text for t, text in self.log if t == topic]

    def wait(self, topic, count, timeout=300):
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.on(topic)) >= count, timeout), self.log
        return self.on(topic)

    def core(self, model, **kw):
        return ros2.AnswerCore(model, self.publisher("answer"), publish_partial=self.publisher("partial"),
                               publish_reasoning=self.publisher("reasoning"), log=self.lines.append, **kw)


@pytest.fixture(scope="module")
def smol(smollm2_bundle):
    return load(smollm2_bundle)


@pytest.fixture(scope="module")
def tiny(tiny_bundle):
    return load(tiny_bundle)


def _expected(model, question, **kw):
    return model.generate(messages=model.chat_prompt(question), **kw)


def test_the_core_imports_no_ros():
    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('n', {str(EXAMPLE)!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); m.AnswerCore; "
            "print([k for k in sys.modules if k.split('.')[0] in ('rclpy', 'std_msgs', 'rcl_interfaces')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_answers_in_order_with_partial_text_before_each_answer(smol):
    questions = ["Why is the sky blue?", "What is 2+2?"]
    topics = Topics()
    core = topics.core(smol, queue_size=2, **GREEDY)
    threads = threading.active_count()
    assert all(core.submit(q) for q in questions)
    answers = topics.wait("answer", 2)
    assert core.shutdown() and threading.active_count() == threads - 1   # the worker thread is gone
    expected = [_expected(smol, q, **GREEDY).answer for q in questions]
    assert answers == expected and all(expected)
    # the partial topic carries each answer's deltas, all of them before that answer
    first_answer = topics.log.index(("answer", expected[0]))
    partial_first = [text for t, text in topics.log[:first_answer] if t == "partial"]
    assert "".join(partial_first) == expected[0]
    assert "".join(topics.on("partial")) == "".join(expected)
    assert topics.on("reasoning") == []     # SmolLM2 does not reason


def test_queue_size_zero_replies_busy_while_generating(smol):
    topics = Topics()
    core = topics.core(smol, queue_size=0, **GREEDY)
    assert core.submit("What is 2+2?")
    assert not core.submit("And 3+3?")         # the first is still queued or running: busy, at once
    assert topics.on("answer") == [ros2.BUSY_REPLY]
    answers = topics.wait("answer", 2)
    assert answers[1] == _expected(smol, "What is 2+2?", **GREEDY).answer
    assert core.submit("And 3+3?")             # free again
    assert topics.wait("answer", 3)[2] == _expected(smol, "And 3+3?", **GREEDY).answer
    core.shutdown()


def test_queue_holds_questions_behind_the_running_one(smol):
    topics = Topics()
    core = topics.core(smol, queue_size=1, busy_reply="busy", **GREEDY)
    assert [core.submit(q) for q in ("What is 2+2?", "What is 3+3?", "What is 4+4?")] == [True, True, False]
    assert core.pending == 2
    answers = topics.wait("answer", 3)
    assert answers == ["busy"] + [_expected(smol, q, **GREEDY).answer for q in ("What is 2+2?", "What is 3+3?")]
    core.shutdown()
    assert core.pending == 0


def test_shutdown_cancels_the_running_generation_and_drops_the_queue(smol, monkeypatch):
    finished = record_results(monkeypatch, smol)
    topics = Topics()
    threads = threading.active_count()
    core = topics.core(smol, queue_size=2, **LONG)
    assert core.submit("Tell me a long story.") and core.submit("And another one.")
    topics.wait("partial", 2)                       # the first is generating
    assert core.shutdown()
    assert threading.active_count() == threads and not smol._lock.locked()
    assert [r.finish_reason for r in finished] == ["cancelled"] and finished[0].completion_tokens < 600
    assert topics.on("answer") == [] and core.pending == 0    # nothing published for either question
    assert "shutdown: 1 waiting question(s) dropped" in topics.lines
    assert not core.submit("Anyone there?") and topics.on("answer") == []


def test_reasoning_is_published_before_its_answer(tiny):
    # the tiny model's template opens <think>; a thinking budget makes it answer after 5 reasoning tokens
    kw = dict(max_new_tokens=20, temperature=0, thinking_budget=5)
    expected = _expected(tiny, "hello robot", **kw)
    topics = Topics()
    core = topics.core(tiny, **kw)
    core.submit("hello robot")
    topics.wait("answer", 1)
    core.shutdown()
    assert expected.reasoning and expected.answer
    assert [(t, x) for t, x in topics.log if t != "partial"] == [("reasoning", expected.reasoning),
                                                                  ("answer", expected.answer)]
    assert "".join(topics.on("partial")) == expected.answer   # partial text is the answer only


def test_a_question_that_cannot_be_answered_gets_an_error_reply(tiny):
    topics = Topics()
    core = topics.core(tiny, max_new_tokens=4, temperature=0)
    core.submit("robot " * 400)                 # longer than the tiny bundle's 256-token context
    core.submit("hello robot")
    answers = topics.wait("answer", 2)
    core.shutdown()
    assert answers[0].startswith("error: the prompt has ") and "max_context is 256" in answers[0]
    assert answers[1] == _expected(tiny, "hello robot", max_new_tokens=4, temperature=0).answer


def test_a_failing_publisher_does_not_stop_the_worker(tiny):
    topics = Topics()
    answers = topics.publisher("answer")

    def broken(text):
        raise RuntimeError("publisher's context is not valid")
    core = ros2.AnswerCore(tiny, answers, publish_partial=broken, publish_reasoning=broken,
                           log=topics.lines.append, max_new_tokens=12, temperature=0, thinking_budget=3)
    core.submit("hello robot")
    core.submit("hello again")
    assert len(topics.wait("answer", 2)) == 2
    assert core.shutdown()
    assert "publish failed: publisher's context is not valid" in topics.lines


def test_bad_options_fail_when_the_core_is_made(tiny):
    with pytest.raises(GenerationError, match="invalid thinking_budget -2"):
        ros2.AnswerCore(tiny, print, thinking_budget=-2)
    with pytest.raises(ValueError, match="invalid queue_size -1"):
        ros2.AnswerCore(tiny, print, queue_size=-1)


# ----- main() against a stand-in of rclpy's Humble API (rclpy 3.3: signatures from rclpy/__init__.py, node.py) --
class _ExternalShutdown(Exception):
    """rclpy.executors.ExternalShutdownException: what spin raises once SIGINT shut the context down."""


class _InvalidParameterType(Exception):
    """rclpy.exceptions.InvalidParameterTypeException (a declared parameter's type is fixed by its default)."""


class _Param:
    def __init__(self, value):
        self.value = value


class _String:
    """std_msgs.msg.String: keyword construction; the generated setter refuses a non-str."""

    def __init__(self, **kw):
        assert set(kw) <= {"data"}, kw
        self.data = kw.get("data", "")
        assert isinstance(self.data, str), "The 'data' field must be of type 'str'"


class _Ros:
    """rclpy, rclpy.node, rclpy.executors and std_msgs.msg as one recording stand-in. ``spin`` sends the
    scripted questions, waits for as many answers, then raises ExternalShutdownException (Ctrl-C)."""

    def __init__(self, questions):
        self.questions, self.answers, self.nodes, self.events = questions, [], [], []
        self.args = None
        ros = self

        class Node:
            def __init__(self, node_name, *, context=None, cli_args=None, namespace=None, **kw):
                self.name, self.params, self.pubs, self.subs = node_name, {}, {}, {}
                ros.nodes.append(self)

            def declare_parameter(self, name, value=None, descriptor=None, ignore_override=False):
                given = ros.overrides().get(name, value)
                if type(given) is not type(value):   # rclpy's static typing of declared parameters
                    raise _InvalidParameterType(f"Trying to set parameter '{name}' to '{given}' of type "
                                    f"'{type(given).__name__}', expecting type '{type(value).__name__}'")
                self.params[name] = _Param(given)
                return self.params[name]

            def get_parameter(self, name):
                return self.params[name]

            def create_publisher(self, msg_type, topic, qos_profile, *, callback_group=None, **kw):
                assert msg_type is _String and isinstance(qos_profile, int)

                class Pub:
                    def publish(_, msg):
                        assert isinstance(msg, _String)
                        ros.events.append((topic, msg.data))
                        if topic == "answer":
                            ros.answers.append(msg.data)
                self.pubs[topic] = Pub()
                return self.pubs[topic]

            def create_subscription(self, msg_type, topic, callback, qos_profile, *, callback_group=None, **kw):
                assert msg_type is _String and isinstance(qos_profile, int)
                self.subs[topic] = callback

            def get_logger(self):
                return type("Logger", (), {"info": lambda _, m: ros.events.append(("log", m))})()

            def destroy_node(self):
                ros.events.append(("destroyed", threading.active_count()))

        self.Node = Node

    def overrides(self):
        out, args = {}, list(self.args or [])
        for i, a in enumerate(args):
            if a == "-p":
                name, _, text = args[i + 1].partition(":=")
                for conv in (int, float):
                    try:
                        out[name] = conv(text)
                        break
                    except ValueError:
                        pass
                else:
                    out[name] = {"true": True, "false": False}.get(text, text)
        return out

    def modules(self):
        import types
        rclpy = types.ModuleType("rclpy")
        rclpy.init = lambda *, args=None, context=None, domain_id=None, signal_handler_options=None: \
            setattr(self, "args", args)
        rclpy.spin = self.spin
        rclpy.try_shutdown = lambda *, context=None: self.events.append(("shutdown", None))
        node, executors = types.ModuleType("rclpy.node"), types.ModuleType("rclpy.executors")
        node.Node, executors.ExternalShutdownException = self.Node, _ExternalShutdown
        exceptions = types.ModuleType("rclpy.exceptions")
        exceptions.InvalidParameterTypeException = _InvalidParameterType
        msg = types.ModuleType("std_msgs.msg")
        msg.String = _String
        return {"rclpy": rclpy, "rclpy.node": node, "rclpy.executors": executors, "rclpy.exceptions": exceptions,
                "std_msgs": types.ModuleType("std_msgs"), "std_msgs.msg": msg}

    def spin(self, node, executor=None):
        for q in self.questions:
            node.subs["prompt"](_String(data=q))
        deadline = 600
        while len(self.answers) < len(self.questions) and deadline:
            threading.Event().wait(0.5)
            deadline -= 1
        raise _ExternalShutdown()


def test_main_wires_parameters_topics_and_shutdown(tiny_bundle, tiny, monkeypatch):
    ros = _Ros(["hello robot"])
    for name, module in ros.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    threads = threading.active_count()
    argv = ["ros2_node.py", "--ros-args", "-p", f"bundle:={tiny_bundle}", "-p", "max_new_tokens:=12",
            "-p", "thinking_budget:=3", "-p", "temperature:=0.0", "-p", "memory_budget:=2GiB", "-p", "queue_size:=0"]
    assert ros2.main(argv) == 0
    expected = _expected(tiny, "hello robot", max_new_tokens=12, thinking_budget=3, temperature=0)
    node = ros.nodes[0]
    assert node.name == "edgekit" and set(node.subs) == {"prompt"}
    assert set(node.pubs) == {"answer", "answer_partial", "reasoning"}
    assert ros.answers == [expected.answer]
    assert ("reasoning", expected.reasoning) in ros.events
    # the core's worker had ended before the node was destroyed, and rclpy was shut down last
    assert ros.events[-2:] == [("destroyed", threads), ("shutdown", None)]


@pytest.mark.parametrize("args, message", [
    ([], "no bundle: run with --ros-args -p bundle:="),
    (["-p", "bundle:=/nonexistent/bundle"], "/nonexistent/bundle"),
    (["-p", "bundle:=B", "-p", "temperature:=0"], "Trying to set parameter 'temperature' to '0' of type 'int'"),
])
def test_main_refuses_bad_parameters_in_one_line(monkeypatch, capsys, tiny_bundle, args, message):
    ros = _Ros([])
    for name, module in ros.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    args = [a.replace("bundle:=B", f"bundle:={tiny_bundle}") for a in args]
    assert ros2.main(["ros2_node.py", "--ros-args", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edgekit ros2 node: ") and message in err
    assert ros.events[-1] == ("shutdown", None)
