"""The engine process's loop and the server's side of it, in one process: typed messages
(serve/messages.py) go both ways, a `Reported` request sends each id once, and a `Choice` is
the one owner of its lifecycle (waiting, running, finished or failed)."""

from __future__ import annotations

import asyncio
import pickle

import pytest
import torch

from pldr import Engine, PLDRConfig, PLDRModel, generate
from pldr.serve.app import refusal
from pldr.serve.choice import FINISHED, RUNNING, WAITING, Choice
from pldr.serve.messages import Cancel, Failure, Sampling, Step, Stop, Submit, Update
from pldr.serve.runner import EngineLoop, EngineRunner, EngineSpec

GREEDY = Sampling(temperature=0.0)


class Pipe:
    """One end of a pipe: what is sent, as the other process would receive it."""

    def __init__(self):
        self.sent: list = []

    def send(self, message) -> None:
        self.sent.append(pickle.loads(pickle.dumps(message)))


class Letters:
    """A tokenizer stand-in: id i decodes to one letter."""

    @staticmethod
    def decode(ids) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model() -> PLDRModel:
    torch.manual_seed(0)
    return PLDRModel(PLDRConfig.preset("tiny").replace(num_layers=1, max_seq_len=48)).eval()


def _run(loop: EngineLoop) -> None:
    while loop.running:
        loop.step()


def test_messages_are_frozen_and_picklable():
    m = Submit(3, (5, 6), 4, Sampling(temperature=0.5, seed=2))
    assert pickle.loads(pickle.dumps(m)) == m
    with pytest.raises(AttributeError):
        m.id = 4
    assert m.sampling.keywords() == dict(temperature=0.5, top_k=0, top_p=1.0, seed=2,
                                         logprobs=None, prompt_logprobs=None)


def test_the_engine_loop_sends_each_id_once_and_equals_generate(model):
    out = Pipe()
    loop = EngineLoop(Engine(model, max_batch=2), None, out)
    prompts = {0: [5, 6, 7], 1: [9, 4], 2: [11, 12, 13, 14]}
    for i, prompt in prompts.items():
        assert loop.apply(Submit(i, tuple(prompt), 5 + i, GREEDY))
    assert loop.apply(Submit(7, (5, 0, 6), 3, GREEDY))  # the pad id: the engine refuses it
    _run(loop)
    assert all(isinstance(m, Step) for m in out.sent)
    assert any(m.ids for m in out.sent)  # ids alone come as (choice id, ids) pairs
    assert all(isinstance(u, Update) for m in out.sent for u in m.updates)
    # in the order sent (a step holds at most one entry per choice)
    updates = [u for m in out.sent for u in [Update(i, ids) for i, ids in m.ids] + list(m.updates)]
    (refused,) = [u for u in updates if u.id == 7]
    assert refused.done and refused.failure.kind == "refused"
    assert refused.failure.param == "prompts" and "pad id" in refused.failure.message
    for i, prompt in prompts.items():
        mine = [u for u in updates if u.id == i]
        assert [u.done for u in mine] == [False] * (len(mine) - 1) + [True]
        got = [t for u in mine for t in u.ids]
        assert got == generate(model, [prompt], 5 + i, temperature=0)[0]
    assert not loop.running and not loop.apply(Stop())


def test_a_cancelled_request_sends_nothing_more(model):
    out = Pipe()
    loop = EngineLoop(Engine(model, max_batch=2), None, out)
    loop.apply(Submit(0, (5, 6), 20, GREEDY))
    loop.step()
    loop.apply(Cancel(0))
    assert not loop.running
    sent = len(out.sent)
    loop.apply(Cancel(0))  # twice, or after it ended: nothing happens
    assert len(out.sent) == sent


def test_the_runner_hands_updates_to_their_choices_and_frees_a_cut_one():
    ended: list[Choice] = []
    runner = EngineRunner(EngineSpec(model="unused"), max_queue=2, on_finish=ended.append)
    runner._commands = Pipe()

    async def scenario() -> None:
        plain, cut = Choice(Letters, (), eos_id=-1), Choice(Letters, ("d",), eos_id=-1)
        for c in (plain, cut):
            runner.submit(c, [1, 2], 6, GREEDY)
        assert [type(m) for m in runner._commands.sent] == [Submit, Submit]
        assert runner.waiting == 2 and runner.running == 0 and plain.phase == WAITING
        runner._dispatch(Step(((plain.id, (0, 1)), (cut.id, (2,)))))
        assert runner.running == 2 and plain.phase == RUNNING and plain.text == "ab"
        runner._dispatch(Step(((cut.id, (3, 4)),), (Update(plain.id, (2,), done=True),)))
        assert plain.done and plain.text == "abc" and plain.finish_reason == "length"
        assert cut.done and cut.text == "c" and cut.cut  # "d" is a stop string
        assert runner._commands.sent[-1] == Cancel(cut.id)  # its slot is freed at once
        assert set(ended) == {plain, cut} and runner.running == runner.waiting == 0
        runner._dispatch(Step(updates=(Update(cut.id, (5,), done=True),)))  # late: dropped
        assert cut.text == "c" and len(ended) == 2

    asyncio.run(scenario())


def test_a_failed_engine_fails_every_choice_it_held():
    runner = EngineRunner(EngineSpec(model="unused"))
    runner._commands = Pipe()

    async def scenario() -> None:
        woke: list[int] = []
        choice = Choice(Letters, (), eos_id=-1, wake=lambda: woke.append(1))
        runner.submit(choice, [1], 4, GREEDY)
        runner._engine_ended("the engine process exited")
        await asyncio.sleep(0)  # the failure runs on the loop
        assert choice.phase == FINISHED and choice.failure.kind == "engine" and woke
        assert refusal(choice.failure).status == 503

    asyncio.run(scenario())
    assert runner.error == "the engine process exited"


def test_a_refusal_names_the_request_field():
    e = refusal(Failure("refused", "`max_new_tokens` must be >= 0", "max_new_tokens"))
    assert (e.status, e.param, e.message) == (400, "max_tokens", "max_tokens must be >= 0")
    assert refusal(Failure("refused", "prompt 0 has the pad id", "prompts")).param == "prompt"
    assert refusal(Failure("refused", "something else")).param == "prompt"
    model_error = refusal(Failure("model", "NaN logits; check any `G_LM` file"))
    assert model_error.status == 500 and model_error.message == "NaN logits; check any G_LM file"
